"""Evaluation: generation, judges, scoring, statistics."""
