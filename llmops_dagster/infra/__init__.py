"""The platform's infrastructure: database and roles, secrets, the Dagster instance and UI,
settings, run progress, lineage helpers and plots; the stages' folders build on it."""
