"""The Dagster instance of this machine: runs, events and schedules in PostgreSQL.

`dagster.yaml` under $DAGSTER_HOME points dagster-postgres at the URL in
LLMOPS_DAGSTER_DATABASE_URL, which `prepare_dagster_home` sets: by default the `dagster` database of
the platform's own server (embedded or by LLMOPS_DATABASE_URL).
"""

from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

import psutil
import sqlalchemy as sa
from dagster import DefaultRunLauncher
from dagster._core.events import DagsterEventType
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.tags import GRPC_INFO_TAG

from llmops_dagster.infra import database
from llmops_dagster.infra.settings import dagster_home

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
# The run worker's health, checked by the daemon: a run whose worker died (killed with the daemon's
# process group, or OOM-killed) is marked failed within poll_interval_seconds, and the trainer
# pool's slot its fine-tune held is freed free_slots_after_run_end_seconds later, so its retry can
# train. Dagster's DefaultRunLauncher has no health check; LocalRunLauncher adds one.
run_launcher:
  module: llmops_dagster.infra.instance
  class: LocalRunLauncher
run_monitoring:
  enabled: true
  # Seconds between checks: a dead worker is noticed within 15 s (the loop's sensors tick every
  # 15 s); a check is one event-log query and one process lookup a run in progress.
  poll_interval_seconds: 15
  # A run worker imports torch, transformers and dagster: 10-30 s on 2 busy cores; past 3 minutes
  # it is not coming.
  start_timeout_seconds: 180
  cancel_timeout_seconds: 180
  # A dead worker is not resumed in place (the DefaultRunLauncher cannot): run_retries starts a new
  # run from the failure instead.
  max_resume_run_attempts: 0
  free_slots_after_run_end_seconds: 5
# Runs tagged dagster/max_retries are retried by the daemon when they fail: the rollback job on any
# failure; the retrain job (FROM_FAILURE: finished steps reused, the fine-tune resumed from its last
# DeepSpeed checkpoint) only when the failure came from outside its steps (a dead run worker).
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


# Slack between a process's start and the engine event that reports it (seconds): a process that
# started later than this after the event is another one with a reused pid.
PID_REUSE_SLACK_S = 5.0


class LocalRunLauncher(DefaultRunLauncher):
    """Dagster's DefaultRunLauncher (the code server starts a run worker process a run) with the
    health check that run monitoring needs: a run in progress whose worker process is gone failed.

    The worker's pid is the one the code server reported ("Started process for run (pid: N)."). A
    code server on another machine cannot be checked from here: its runs count as running (use a
    launcher with its own health check there, such as Kubernetes')."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run) -> CheckRunHealthResult:
        if not _code_server_is_local(run.tags.get(GRPC_INFO_TAG)):
            return CheckRunHealthResult(WorkerStatus.RUNNING, "code server on another machine: "
                                        "its run worker cannot be checked from here")
        started = run_worker_start(self._instance, run.run_id)
        if started is None:
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no run worker reported yet")
        pid, at = started
        return worker_status(pid, at)


def run_worker_start(instance, run_id: str) -> tuple[int, float] | None:
    """(pid, when it was reported, epoch seconds) of the newest run worker the code server started
    for run `run_id`, or None."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT,
                                           ascending=False, limit=10_000).records
    for record in records:
        event = record.event_log_entry.dagster_event
        metadata = event.engine_event_data.metadata if event and event.engine_event_data else {}
        if "pid" in metadata and record.event_log_entry.message.startswith("Started process for run"):
            return int(metadata["pid"].value), record.event_log_entry.timestamp
    return None


def worker_status(pid: int, reported_at: float) -> CheckRunHealthResult:
    """RUNNING while process `pid`, started no later than `reported_at` (+ slack), lives; FAILED
    when it is gone, a zombie, or its pid now belongs to a younger process."""
    try:
        process = psutil.Process(pid)
        alive = process.status() != psutil.STATUS_ZOMBIE
        same = process.create_time() <= reported_at + PID_REUSE_SLACK_S
    except psutil.NoSuchProcess:
        alive = same = False
    if alive and same:
        return CheckRunHealthResult(WorkerStatus.RUNNING, f"run worker pid {pid} is alive")
    return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker pid {pid} is gone (killed, or "
                                "ended with its process group) while the run was in progress")


def _code_server_is_local(grpc_info: str | None) -> bool:
    """Whether the code server in a run's GRPC_INFO_TAG runs on this machine (a Unix socket, a
    loopback address, or this host's name)."""
    if not grpc_info:
        return True  # not launched through a code server: nothing to tell it from
    info = json.loads(grpc_info)
    if info.get("socket"):
        return True
    host = str(info.get("host") or "localhost")
    return host in ("localhost", "::1", socket.gethostname(), socket.getfqdn()) or host.startswith("127.")
