"""The Dagster instance of this machine: runs, events and schedules in PostgreSQL.

`dagster.yaml` under $DAGSTER_HOME points dagster-postgres at the URL in
LLMOPS_DAGSTER_DATABASE_URL, which `prepare_dagster_home` sets: by default the `dagster` database of
the platform's own server (embedded or by LLMOPS_DATABASE_URL).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from llmops_dagster import database
from llmops_dagster.settings import dagster_home

DAGSTER_URL_ENV = "LLMOPS_DAGSTER_DATABASE_URL"
# The pool of finetuned_checkpoint: one fine-tune at a time on an instance.
TRAINER_POOL = "trainer"

DAGSTER_YAML = f"""\
# Written by `llmops`: Dagster's run, event-log and schedule storage in PostgreSQL.
storage:
  postgres:
    postgres_url:
      env: {DAGSTER_URL_ENV}
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    # A queued run starts within a second, not five (Dagster's default): the loop's budget from
    # trigger to served model is a minute.
    dequeue_interval_seconds: 1
# Two runs at a time. One fine-tune at a time: finetuned_checkpoint is in pool "trainer", which
# `llmops` gives one slot (any other pool gets one by default); a second run waits at that step
# instead of training into the same folder.
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


def dagster_database_url(postgres) -> str:
    """LLMOPS_DAGSTER_DATABASE_URL when set, else the `dagster` database of the platform's server
    (`postgres`, a PostgresResource)."""
    configured = os.environ.get(DAGSTER_URL_ENV, "").strip()
    if configured:
        return database.sqlalchemy_url(configured, setting=DAGSTER_URL_ENV)
    return postgres.dagster_url()


@contextmanager
def _environment(values: dict[str, str]):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def configure_trainer_pool(instance) -> None:
    """Give pool "trainer" its one slot before any run reaches it, unless a person set a limit.

    Left to the default limit, Dagster creates a pool's limit row when the first step claims it,
    and several runs reaching a new pool at once race: the losers' INSERT fails inside a
    transaction that PostgreSQL then aborts, so their UPDATE fails too and the step fails (1 of 4
    simultaneous fine-tunes, seen in CI). A limit set here is never created on first use.
    """
    storage = instance.event_log_storage
    if TRAINER_POOL in {limit.name for limit in storage.get_pool_limits()}:
        return
    try:
        storage.set_concurrency_slots(TRAINER_POOL, 1)
    except sa.exc.IntegrityError:  # set by a process preparing the same instance at this moment
        pass


def prepare_dagster_home(postgres) -> dict[str, str]:
    """Write dagster.yaml when missing and give the trainer pool its slot; return the environment
    that the Dagster processes need."""
    import dagster as dg

    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    config = Path(home) / "dagster.yaml"
    # Ours (first line) and out of date: rewritten; a file a person wrote is left alone.
    if not config.exists() or (config.read_text().startswith(WRITTEN_BY_LLMOPS)
                               and config.read_text() != DAGSTER_YAML):
        config.write_text(DAGSTER_YAML)
    environment = {"DAGSTER_HOME": str(home), DAGSTER_URL_ENV: dagster_database_url(postgres)}
    with _environment(environment), dg.DagsterInstance.from_config(str(home)) as instance:
        configure_trainer_pool(instance)
    return environment
