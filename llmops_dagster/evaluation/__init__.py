"""Evaluation stage: scoring models on the eval split and storing the report."""
