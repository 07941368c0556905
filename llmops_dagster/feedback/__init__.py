"""Feedback stage: curating production feedback into training material."""
