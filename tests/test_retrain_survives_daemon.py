"""A requested retrain is never lost: the daemon that launched it is killed, process group and all,
in the middle of its fine-tune, and started again; the retrain still ends, evaluated and judged.

The first model is trained, approved and served in this process (the main job, the default model
at fewer steps). Then the real daemon, started as a process group of its own on the
workspace of `make ui` (its code server and the run workers are in that group), runs
feedback_sensor: counted down-votes with reviewed corrections request a retrain. Once its fine-tune
has written a complete DeepSpeed checkpoint, the daemon's group gets SIGKILL: the run worker dies
with it, and its training stops too (the trainer's launchers get SIGTERM when the worker dies).
Started again, the daemon's run monitoring finds the worker gone and fails the run; run retries
re-execute it from the failure: finished steps reused, the fine-tune resumed from its checkpoint,
then evaluated and judged: as a loop retrain it is promoted only on an improvement of the
complaint slice, and with every corrected question in its train split there is none to measure, so
production stays served.

Touches: a platform database and a Dagster database (PostgreSQL storage, dagster.yaml as `llmops`
writes it) of its own on the session's server, DAGSTER_HOME under tmp_path, the session's artifact
root and Ray head (LLMOPS_TEST_HTTP_PORT, LLMOPS_TEST_RAY_PORT), 2 DeepSpeed ranks, a daemon with its
code server.
"""

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import dagster as dg
import psutil
import pytest

from llmops_dagster.dataset.synthetic_data import reference_answer
from llmops_dagster.definitions import defs
from llmops_dagster.governance import registry
from llmops_dagster.infra.instance import prepare_dagster_home
from llmops_dagster.loop.runs import DECISION_TAG
from llmops_dagster.serving import credentials
from llmops_dagster.training import checkpoints
from resources.artifacts import ArtifactStore
from resources.embedder import EmbedderResource
from resources.loop_settings import LoopSettings
from resources.trainer import TrainerResource
from schedules.jobs import main_job
from tests.test_production_shape import BIN, REPO, Services, run_worker_pid, wait_for
from tests.test_two_node_training import no_training_left

QUESTIONS = [(f"Where is my order A{20000 + i}?", "order_status", {"order": f"A{20000 + i}"})
             for i in range(40)]
# The first model: the default one at 300 of its 800 steps (loss about 0.08 there), which the
# default policy approves; 40 eval questions, as served_template.
MAIN_CONFIG = {"ops": {"finetuned_checkpoint": {"config": {"max_steps": 300, "checkpoint_every": 300}},
                       "eval_report": {"config": {"max_examples": 40}}}}
START_TIMEOUT_S = 300  # the daemon, its code server and a run worker on 2 shared cores
RUN_TIMEOUT_S = 900


def post(url: str, body: dict, key: str) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture
def platform(fresh_database, dagster_database, ray_serve, tmp_path, monkeypatch):
    """This test's platform: its databases, DAGSTER_HOME with dagster.yaml as `llmops` writes it,
    the session's Ray head (the daemon's runs find it by the same ports and LLMOPS_HOME)."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("LLMOPS_SERVE_HTTP_PORT", str(ray_serve.http_port))
    monkeypatch.setenv("LLMOPS_RAY_PORT", str(ray_serve.local_port))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    prepare_dagster_home(fresh_database)
    return {"database": fresh_database, "ray_serve": ray_serve}


def finetune_folders(artifacts: ArtifactStore) -> set[Path]:
    root = artifacts.root_path() / "finetunes"
    return set(root.iterdir()) if root.is_dir() else set()


def materialized(instance, run_id: str, asset: str) -> dict:
    for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION,
                                               limit=1000).records:
        event = record.event_log_entry.dagster_event
        if event.asset_key == dg.AssetKey(asset):
            return {k: v.value for k, v in event.materialization.metadata.items()}
    raise AssertionError(f"run {run_id} did not materialize {asset}")


def test_a_retrain_killed_with_the_daemon_is_retried_and_served(platform, tmp_path):
    engine, ray_serve = platform["database"].engine(), platform["ray_serve"]
    artifacts = ArtifactStore()  # the daemon's runs use the default root too
    with dg.DagsterInstance.get() as instance:
        first = dg.materialize(
            list(defs.assets), selection=main_job.selection, instance=instance, run_config=MAIN_CONFIG,
            resources={"database": platform["database"], "artifacts": artifacts,
                       "embedder": EmbedderResource(), "trainer": TrainerResource(),
                       "ray_serve": ray_serve, "loop_settings": LoopSettings()})
        assert first.success
    served = registry.production(engine).version
    assert ray_serve.served_version() == served
    before = finetune_folders(artifacts)

    services = Services(tmp_path, dict(os.environ))
    try:
        daemon = services.start("daemon", str(BIN / "dagster-daemon"), "run", "-w",
                                str(REPO / "workspace.yaml"))
        # The trigger: counted down-votes with corrections from 7 reviewers (accepted as sent; one
        # actor's votes count 3 times at most, and the sensor needs 5 actors).
        keys = [credentials.create_key(engine, f"retrain-test-reviewer-{n}", "reviewer",
                                       created_by="test")[1] for n in range(7)]
        for n, (question, intent, fields) in enumerate(QUESTIONS[:LoopSettings().feedback_threshold]):
            key = keys[n % len(keys)]
            answer = post(f"{ray_serve.url()}/v1/generate", {"prompt": question}, key)
            stored = post(f"{ray_serve.url()}/v1/feedback", {
                "response_id": answer["response_id"], "rating": -1,
                "correction": reference_answer(intent, **fields)}, key)
            assert stored["counted"], stored

        def checkpointed():  # the retrain's fine-tune, with a complete checkpoint
            for folder in finetune_folders(artifacts) - before:
                if checkpoints.latest_complete(folder / "deepspeed"):
                    return folder
            return None

        folder = wait_for("a checkpoint of the retrain's fine-tune", checkpointed, services,
                          START_TIMEOUT_S, every_s=0.1)
        with dg.DagsterInstance.get() as instance:
            [run] = instance.get_runs(filters=dg.RunsFilter(job_name="retrain"))
            worker = run_worker_pid(instance, run.run_id)
        assert worker in {p.pid for p in services.tree("daemon")}  # in the daemon's process group
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
        del services.started["daemon"]
        killed_at = time.monotonic()
        _, step = checkpoints.latest_complete(folder / "deepspeed")
        assert not (folder / "DONE").exists(), "the fine-tune ended before the daemon was killed"
        def worker_gone():  # SIGKILL is delivered at once, taken when the kernel next runs it
            return not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE

        wait_for("the run worker to die with the daemon's group", worker_gone, services, 10, every_s=0.1)
        assert no_training_left(artifacts, within_s=60) == []  # no orphan trains into the folder
        print(f"\nretrain {run.run_id} killed with the daemon at checkpoint step {step}")

        services.start("daemon-again", str(BIN / "dagster-daemon"), "run", "-w",
                       str(REPO / "workspace.yaml"))

        def decision_runs():
            with dg.DagsterInstance.get() as instance:
                return instance.get_runs(filters=dg.RunsFilter(tags={DECISION_TAG: run.tags[DECISION_TAG]}),
                                         ascending=True)

        def retried_and_finished():
            runs = decision_runs()
            return runs if any(r.status == dg.DagsterRunStatus.SUCCESS for r in runs) or (
                len(runs) > 1 and runs[-1].is_finished) else None

        runs = wait_for("the retrain's retry", retried_and_finished, services, RUN_TIMEOUT_S)
        print(f"retried and finished {time.monotonic() - killed_at:.1f} s after the kill")
        with dg.DagsterInstance.get() as instance:
            original, retry = runs
            assert original.run_id == run.run_id and original.status == dg.DagsterRunStatus.FAILURE
            [failure] = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
            assert f"run worker pid {worker} is gone" in failure.message
            assert retry.status == dg.DagsterRunStatus.SUCCESS, services.logs()
            assert retry.parent_run_id == run.run_id and retry.tags["dagster/retry_number"] == "1"
            steps = {s.step_key for s in instance.get_run_step_stats(retry.run_id)}
            assert "feedback_table" not in steps and "finetuned_checkpoint" in steps  # from the failure
            finetune = materialized(instance, retry.run_id, "finetuned_checkpoint")
            assert finetune["path"] == str(folder) and finetune["resumed_from_step"] >= step
            assert finetune["global_step"] == LoopSettings().retrain_steps
            approved = materialized(instance, retry.run_id, "approved_model")
        # The retrain is a loop's (require_improvement): every corrected question hashed into its
        # train split, so no complaint is held out to improve on ("no new signal") and production
        # stays what is served.
        assert approved["change"] == "no improvement" and "no new signal" in approved["reason"]
        assert registry.get(engine, finetune["version"]).stage == "rejected"
        assert registry.production(engine).version == served == ray_serve.served_version()
    finally:
        left = services.stop()
    assert not left, f"processes left after the daemon stopped: {left}"
