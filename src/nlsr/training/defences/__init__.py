"""Baseline defences compared against NLSR."""
