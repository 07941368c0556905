"""A requested retrain is never lost, and never retried without end: the decision to request a
lost decision again (pure), the run worker health check of LocalRunLauncher on real processes, the
instance settings `llmops` writes (accepted by Dagster's schema), and feedback_sensor requesting a
window again after its run died outside its code, but not after its own code failed. Touches the
session's PostgreSQL (a database of this test's own) and a test Dagster instance."""

import subprocess
import sys
import time

import dagster as dg
import pytest
import yaml
from dagster._core.events import JobFailureData, RunFailureReason

from llmops_dagster.definitions import defs
from llmops_dagster.infra.instance import DAGSTER_YAML, LocalRunLauncher, worker_status
from llmops_dagster.loop.runs import DECISION_TAG, REQUEST_NUMBER_TAG, Attempt, next_request
from schedules.automation import feedback_sensor
from schedules.jobs import RETRAIN_RETRIES
from tests.test_sensors import engine, evaluate, serve  # noqa: F401  (the fixture and helpers)

FAILED = "FAILURE"
DEAD_WORKER = Attempt(FAILED)  # run monitoring's failure carries no reason
RETRYING = Attempt(FAILED, will_retry=True)
DEAD_RETRY = Attempt(FAILED, retry=True)
STEP_FAILED = Attempt(FAILED, failure_reason="STEP_FAILURE")


@pytest.mark.parametrize(("attempts", "expected"), [
    ([], None),
    ([DEAD_WORKER], 1),  # the first request's run died: requested again as request 1
    ([Attempt(FAILED, failure_reason="UNEXPECTED_TERMINATION")], 1),
    ([Attempt(FAILED, failure_reason="START_TIMEOUT")], 1),
    ([RETRYING], None),  # the daemon retries it first
    ([RETRYING, DEAD_RETRY, DEAD_RETRY], 1),  # its retries died too (retries are not requests)
    ([DEAD_WORKER, DEAD_WORKER], 2),
    ([DEAD_WORKER, DEAD_WORKER, DEAD_WORKER], None),  # requested max_requests (3) times
    ([STEP_FAILED], None),  # its own code failed: the same inputs would fail again
    ([Attempt(FAILED, failure_reason="RUN_EXCEPTION")], None),
    ([Attempt(FAILED, failure_reason="JOB_INITIALIZATION_FAILURE")], None),
    ([RETRYING, Attempt(FAILED, failure_reason="STEP_FAILURE", retry=True)], None),
    ([DEAD_WORKER, Attempt("SUCCESS")], None),
    ([Attempt("CANCELED")], None),  # a person stopped it
    ([DEAD_WORKER, Attempt("STARTED")], None),
    ([DEAD_WORKER, Attempt("QUEUED")], None),
])
def test_when_a_decision_is_requested_again(attempts, expected):
    assert next_request(attempts, max_requests=3) == expected


def test_the_health_check_sees_a_dead_run_worker():
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    reported = time.time()
    try:
        assert worker_status(worker.pid, reported).status.value == "RUNNING"
    finally:
        worker.kill()
    time.sleep(0.5)
    assert worker_status(worker.pid, reported).status.value == "FAILED"  # a zombie, not yet reaped
    worker.wait()
    gone = worker_status(worker.pid, reported)
    assert gone.status.value == "FAILED" and f"run worker pid {worker.pid} is gone" in gone.msg
    # A live process with the pid of a worker reported long before it started: pid reused.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert worker_status(other.pid, time.time() - 3600).status.value == "FAILED"
    finally:
        other.kill()
        other.wait()


def test_the_instance_monitors_run_workers_and_retries_retrains():
    settings = yaml.safe_load(DAGSTER_YAML)
    overrides = {key: settings[key] for key in ("run_launcher", "run_monitoring", "run_retries")}
    with dg.instance_for_test(overrides=overrides) as instance:  # Dagster's schema accepts them
        assert isinstance(instance.run_launcher, LocalRunLauncher)
        assert instance.run_launcher.supports_check_run_worker_health
        assert instance.run_monitoring_enabled and instance.run_retries_enabled
        assert instance.run_monitoring_poll_interval_seconds == 15
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0
    retrain = defs.resolve_job_def("retrain")
    assert {k: retrain.tags[k] for k in RETRAIN_RETRIES} == RETRAIN_RETRIES


def launch(instance, request: dg.RunRequest) -> dg.DagsterRun:
    """The run the daemon creates for `request` (not started yet)."""
    return instance.create_run_for_job(job_def=defs.resolve_job_def("retrain"),
                                       run_config=request.run_config,
                                       tags={**request.tags, "dagster/run_key": request.run_key})


def test_feedback_sensor_requests_a_window_again_after_a_dead_worker_only(engine, instance):  # noqa: F811
    serve(engine, "v2", ["q"] * 20, [-1] * 20)
    first, cursor = evaluate(feedback_sensor, instance)
    assert isinstance(first, dg.RunRequest) and first.tags[DECISION_TAG] == first.run_key
    run = launch(instance, first)
    skipped, _ = evaluate(feedback_sensor, instance, cursor)
    assert isinstance(skipped, dg.SkipReason)  # its run is not started yet: nothing is lost

    instance.report_run_failed(run, "run worker pid 1234 is gone")  # as run monitoring reports it
    again, after = evaluate(feedback_sensor, instance, cursor)
    assert isinstance(again, dg.RunRequest), again
    assert after == cursor  # the window was counted; only its run is requested again
    assert again.run_key == f"{first.run_key}-again-1" and again.run_config == first.run_config
    assert again.tags[REQUEST_NUMBER_TAG] == "1" and again.tags[DECISION_TAG] == first.run_key
    assert again.tags["llmops/negative_feedback"] == "20"

    run = launch(instance, again)
    instance.report_run_failed(run, "step failed", JobFailureData(
        error=None, failure_reason=RunFailureReason.STEP_FAILURE))
    result, _ = evaluate(feedback_sensor, instance, cursor)
    assert isinstance(result, dg.SkipReason)  # its own code failed: not requested a third time
    assert "counted negative votes" in result.skip_message


def test_a_window_is_requested_at_most_max_requests_times(engine, instance):  # noqa: F811
    serve(engine, "v2", ["q"] * 20, [-1] * 20)
    request, cursor = evaluate(feedback_sensor, instance, max_requests_per_decision=2)
    keys = []
    while isinstance(request, dg.RunRequest):
        keys.append(request.run_key)
        instance.report_run_failed(launch(instance, request), "run worker gone")
        request, _ = evaluate(feedback_sensor, instance, cursor, max_requests_per_decision=2)
    assert keys == [keys[0], f"{keys[0]}-again-1"]
