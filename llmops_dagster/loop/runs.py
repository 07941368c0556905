"""What the loop asks of Dagster's run history before it requests another run: is one of these jobs
queued or running, and when did the last one start. One indexed query on the run storage each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


# A loop's decision (a feedback window, a drift window) is carried out by the runs that share this
# tag: the first run key the sensor gave it. The daemon's retries of a run copy it.
DECISION_TAG = "llmops/decision"
REQUEST_NUMBER_TAG = "llmops/request_number"  # 0: the sensor's first request of the decision
# Dagster's dagster/failure_reason tag values for failures from outside the run's own code: the
# run worker died or never started. A run that run monitoring failed (its worker gone) has no tag.
OUTSIDE_THE_RUN = frozenset({None, "UNEXPECTED_TERMINATION", "START_TIMEOUT", "RUN_WORKER_RESTART",
                             "UNKNOWN"})
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


@dataclass(frozen=True)
class Attempt:
    """One run of a decision, as the release decision reads it."""

    status: str  # a DagsterRunStatus value
    failure_reason: str | None = None  # the dagster/failure_reason tag
    will_retry: bool = False  # dagster/will_retry: the daemon will launch a retry of it
    retry: bool = False  # the daemon's retry of another run (dagster/retry_number), not a request


def next_request(attempts: Sequence[Attempt], max_requests: int) -> int | None:
    """The request number under which a decision is requested again, or None: its runs
    (`attempts`, oldest first: the requests and the daemon's retries of them) all ended, the
    newest failed from outside its own code with no retry coming, and the decision was requested
    fewer than `max_requests` times. None while a run is queued or in progress, after a success,
    after a failure inside a run's own code (a step or the run's code raised: the same inputs would
    fail again) or a cancel (a person's choice)."""
    if not attempts:
        return None
    if any(a.status not in FINISHED or a.status == "SUCCESS" or a.status == "CANCELED"
           or a.failure_reason not in OUTSIDE_THE_RUN for a in attempts):
        return None
    if attempts[-1].will_retry:
        return None
    requests = sum(not a.retry for a in attempts)
    return requests if requests < max_requests else None


@dataclass(frozen=True)
class LostDecision:
    """A decision whose runs were lost to failures outside them, to be requested again."""

    decision: str
    number: int
    run_config: dict
    tags: dict[str, str]

    def run_request(self) -> dg.RunRequest:
        return dg.RunRequest(run_key=f"{self.decision}-again-{self.number}", run_config=self.run_config,
                             tags={**self.tags, REQUEST_NUMBER_TAG: str(self.number)})


def lost_decision(instance: dg.DagsterInstance, trigger: str, max_requests: int,
                  jobs: list[str]) -> LostDecision | None:
    """The newest decision of `trigger` (the llmops/trigger tag) when next_request releases it and
    no run of `jobs` succeeded since it was first requested, with the run config and llmops/ tags
    of its first run; else None. Only the newest decision matters: a later retrain trains on
    everything an earlier one would have."""
    newest = instance.get_run_records(filters=dg.RunsFilter(tags={"llmops/trigger": trigger}), limit=1)
    decision = newest[0].dagster_run.tags.get(DECISION_TAG) if newest else None
    if decision is None:
        return None
    records = instance.get_run_records(filters=dg.RunsFilter(tags={DECISION_TAG: decision}), limit=100,
                                       ascending=True)
    attempts = [Attempt(status=r.dagster_run.status.value,
                        failure_reason=r.dagster_run.tags.get("dagster/failure_reason"),
                        will_retry=r.dagster_run.tags.get("dagster/will_retry") == "true",
                        retry="dagster/retry_number" in r.dagster_run.tags) for r in records]
    number = next_request(attempts, max_requests)
    if number is None:
        return None
    since = instance.get_run_records(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.SUCCESS], created_after=records[0].create_timestamp), limit=50)
    if any(r.dagster_run.job_name in jobs for r in since):
        return None
    first = records[0].dagster_run
    return LostDecision(decision=decision, number=number, run_config=dict(first.run_config),
                        tags={k: v for k, v in first.tags.items() if k.startswith("llmops/")
                              and k != REQUEST_NUMBER_TAG})
