"""The Dagster instance of this machine: runs, events and schedules in PostgreSQL.

`dagster.yaml` under $DAGSTER_HOME points dagster-postgres at the URL in
LLMOPS_DAGSTER_DATABASE_URL, which `prepare_dagster_home` sets: by default the `dagster` database of
the platform's own server (embedded or by LLMOPS_DATABASE_URL).
"""

from __future__ import annotations

import os
from pathlib import Path

from llmops_dagster import database
from llmops_dagster.settings import dagster_home

DAGSTER_URL_ENV = "LLMOPS_DAGSTER_DATABASE_URL"

DAGSTER_YAML = f"""\
# Written by `llmops`: Dagster's run, event-log and schedule storage in PostgreSQL.
storage:
  postgres:
    postgres_url:
      env: {DAGSTER_URL_ENV}
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
# Two runs at a time. One fine-tune at a time: finetuned_checkpoint is in pool "trainer", and an
# unconfigured pool gets one slot; a second run waits at that step instead of training into the
# same folder.
concurrency:
  runs:
    max_concurrent_runs: 2
  pools:
    granularity: op
    default_limit: 1
# Runs tagged dagster/max_retries (the rollback job) are retried by the daemon when they fail.
run_retries:
  enabled: true
telemetry:
  enabled: false
"""
WRITTEN_BY_LLMOPS = DAGSTER_YAML.splitlines()[0]


def dagster_database_url(admin_url: str) -> str:
    configured = os.environ.get(DAGSTER_URL_ENV, "").strip()
    if configured:
        return database.sqlalchemy_url(configured, setting=DAGSTER_URL_ENV)
    return database.ensure_database(admin_url, database.DAGSTER_DATABASE)


def prepare_dagster_home(admin_url: str) -> dict[str, str]:
    """Write dagster.yaml when missing; return the environment that the Dagster processes need."""
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    config = Path(home) / "dagster.yaml"
    # Ours (first line) and out of date: rewritten; a file a person wrote is left alone.
    if not config.exists() or (config.read_text().startswith(WRITTEN_BY_LLMOPS)
                               and config.read_text() != DAGSTER_YAML):
        config.write_text(DAGSTER_YAML)
    return {"DAGSTER_HOME": str(home), DAGSTER_URL_ENV: dagster_database_url(admin_url)}
