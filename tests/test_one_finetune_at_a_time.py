"""Retrain triggers at once: one fine-tune at a time, and no run spoils another's files.

Four processes materialize finetuned_checkpoint at the same moment against one Dagster instance
configured as `llmops` writes it (PostgreSQL storage, pool "trainer" with one slot). Four is twice
what the instance's run queue would ever start at once (max_concurrent_runs 2), so it stands for
any number of triggers. The fine-tune steps must not overlap in time; every run succeeds; the one
version they all produce is complete.

Touches: a database and a Dagster database of its own on the session's server, an artifact root
under tmp_path, DeepSpeed ranks on this machine.
"""

import multiprocessing
import os
from pathlib import Path

import dagster as dg

from llmops_dagster.infra.instance import TRAINER_POOL

RUNS = 4
SMALL = {"ops": {"finetuned_checkpoint": {"config": {"max_steps": 20, "checkpoint_every": 10}}}}


def _resources(artifacts: str) -> dict:
    from resources.artifacts import ArtifactStore
    from resources.database import PostgresResource
    from resources.embedder import EmbedderResource
    from resources.trainer import TrainerResource

    return {"database": PostgresResource(), "artifacts": ArtifactStore(root=artifacts),
            "embedder": EmbedderResource(), "trainer": TrainerResource()}


def _finetune(environment: dict, artifacts: str, results) -> None:
    """One trigger, in a process of its own: materialize finetuned_checkpoint."""
    os.environ.update(environment)
    from assets.prompts import prompt_set
    from assets.training import base_model, finetuned_checkpoint

    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([prompt_set, base_model, finetuned_checkpoint],
                                selection=[finetuned_checkpoint], resources=_resources(artifacts),
                                instance=instance, run_config=SMALL, raise_on_error=False)
        results.put((result.run_id, result.success))


def test_a_trainer_pool_limit_a_person_set_is_kept(fresh_database, dagster_database, tmp_path,
                                                   monkeypatch):
    from llmops_dagster.infra.instance import prepare_dagster_home

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    environment = prepare_dagster_home(fresh_database)
    with dg.DagsterInstance.get() as instance:
        instance.event_log_storage.set_concurrency_slots(TRAINER_POOL, 2)  # two GPUs, say
    assert prepare_dagster_home(fresh_database) == environment
    with dg.DagsterInstance.get() as instance:
        limits = {p.name: p.limit for p in instance.event_log_storage.get_pool_limits()}
    assert limits[TRAINER_POOL] == 2


def _failures(outcomes: list) -> list[str]:
    """The error each failed run recorded, so a failure here says why, not only that."""
    errors = []
    with dg.DagsterInstance.get() as instance:
        for run_id, success in outcomes:
            if success:
                continue
            for record in instance.get_records_for_run(run_id).records:
                event = record.event_log_entry.dagster_event
                if event is not None and event.event_type_value in ("STEP_FAILURE", "RUN_FAILURE",
                                                                    "ENGINE_EVENT"):
                    data = event.event_specific_data
                    error = getattr(data, "error", None)
                    if error is not None:
                        errors.append(f"{run_id} {event.step_key}: {error.to_string()}")
    return errors


def test_retrain_triggers_at_once_train_one_at_a_time(fresh_database, dagster_database, tmp_path,
                                                      monkeypatch):
    from assets.dataset import raw_examples, validated_dataset
    from assets.prompts import prompt_set
    from assets.training import base_model
    from llmops_dagster.infra.instance import prepare_dagster_home

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    environment = prepare_dagster_home(fresh_database)
    environment.update({name: os.environ[name] for name in
                        ("LLMOPS_DATABASE_URL", "LLMOPS_DATABASE_OWNER_URL", "LLMOPS_SERVING_DATABASE_URL")})
    artifacts = str(tmp_path / "artifacts")
    with dg.DagsterInstance.get() as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        # Set before any run: created on first use, simultaneous first claims race (instance.py).
        [trainer] = [p for p in instance.event_log_storage.get_pool_limits() if p.name == TRAINER_POOL]
        assert (trainer.limit, trainer.from_default) == (1, False)
        assert dg.materialize(
            [raw_examples, validated_dataset, prompt_set, base_model], resources=_resources(artifacts),
            instance=instance, run_config={"ops": {"raw_examples": {"config": {"synthetic_rows": 300}}}},
        ).success

    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    processes = [spawn.Process(target=_finetune, args=(environment, artifacts, results))
                 for _ in range(RUNS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=900)
    outcomes = [results.get(timeout=5) for _ in range(RUNS)]
    assert all(success for _, success in outcomes), (outcomes, _failures(outcomes))

    spans = []
    with dg.DagsterInstance.get() as instance:
        for run_id, _ in outcomes:
            events = {}
            for record in instance.get_records_for_run(run_id).records:
                event = record.event_log_entry
                if event.step_key == "finetuned_checkpoint" and event.dagster_event is not None:
                    events.setdefault(event.dagster_event.event_type_value, event.timestamp)
            spans.append((events["STEP_START"], events["STEP_SUCCESS"]))
    spans.sort()
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:], strict=False)), spans
    [version] = [p for p in (Path(artifacts) / "finetunes").iterdir() if not p.name.startswith(".")]
    assert (version / "DONE").exists() and (version / "adapter").is_dir()
    assert not [p for p in (version / "deepspeed").iterdir() if p.name.startswith(".staging-")]
