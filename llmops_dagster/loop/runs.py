"""What the loop asks of Dagster's run history before it requests another run: is one of these jobs
queued or running, and when did the last one start. One indexed query on the run storage each."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg

IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
             dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def in_flight(instance: dg.DagsterInstance, jobs: list[str]) -> list[dg.DagsterRun]:
    """Runs of `jobs` queued or in progress, newest first."""
    records = instance.get_run_records(filters=dg.RunsFilter(job_name=None, statuses=IN_FLIGHT), limit=50)
    return [r.dagster_run for r in records if r.dagster_run.job_name in jobs]


def last_created(instance: dg.DagsterInstance, job: str) -> datetime | None:
    """When the newest run of `job` was created (queued), whatever became of it."""
    records = instance.get_run_records(filters=dg.RunsFilter(job_name=job), limit=1)
    if not records:
        return None
    created = records[0].create_timestamp
    return created if created.tzinfo else created.replace(tzinfo=UTC)


def seconds_since(moment: datetime | None) -> float | None:
    return None if moment is None else (datetime.now(UTC) - moment).total_seconds()
