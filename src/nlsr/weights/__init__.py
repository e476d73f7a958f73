"""Weights in and out: PEFT adapters, full model directories, loading base models."""
