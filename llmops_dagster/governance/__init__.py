"""Governance stage: the approval policy, the model registry and lineage of a served answer."""
