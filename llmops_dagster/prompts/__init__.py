"""Prompts stage: versioned templates rendered over a validated dataset."""
