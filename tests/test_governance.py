"""Evaluation and governance end to end on real models, DeepSpeed ranks and PostgreSQL: a first
model judged on thresholds alone, a seeded regression (answers shuffled) blocked every time, and a
retrain with another seed, which the default policy finds as good as the champion, waiting in human
mode for a person.

Touches: a database and artifact root of this test's own, and a fresh Dagster instance. Models are
the default fine-tune (benchmarks/bench_quality.py measures its spread over seeds), so the policy's
default margin applies unchanged."""

import json
import random

import dagster as dg
import pandas as pd
import pytest

from assets.dataset import raw_examples, validated_dataset
from assets.evaluation import eval_report
from assets.governance import approved_model
from assets.prompts import prompt_set
from assets.training import base_model, finetuned_checkpoint
from llmops_dagster.dataset.synthetic_data import generate_examples
from llmops_dagster.dataset.validation import as_text, assign_split, normalize_text
from llmops_dagster.governance import registry
from resources.trainer import TrainerResource

PATH = [raw_examples, validated_dataset, prompt_set, base_model, finetuned_checkpoint, eval_report,
        approved_model]
# Far below the default model's measured token F1 (at least 0.95 on seeds 0-4), far above what a
# model trained on shuffled answers reaches.
MIN_TOKEN_F1 = 0.8


@pytest.fixture
def run_path(resources, instance, tmp_path):
    all_resources = {**resources, "trainer": TrainerResource()}

    def run(source: str, seed: int = 0, mode: str = "automatic", selection=None, **approval):
        ops = {
            "raw_examples": {"config": {"source": source}},
            "finetuned_checkpoint": {"config": {"seed": seed}},
            "eval_report": {"config": {"max_examples": 60}},
            "approved_model": {"config": {"mode": mode, "min_token_f1": MIN_TOKEN_F1, **approval}},
        }
        if selection:
            ops = {name: ops[name] for name in ops if name in {a.key.path[-1] for a in selection}}
        return dg.materialize(PATH, selection=selection, resources=all_resources, instance=instance,
                              raise_on_error=False, run_config={"ops": ops})
    return run


def shuffled_answers_file(path) -> str:
    """The synthetic set with every training answer moved to another training question (seeded).
    Eval rows are untouched, so candidate and champion are judged on the same trusted split."""
    rows = generate_examples()
    split = assign_split(normalize_text(as_text(pd.Series([r["prompt"] for r in rows]))), 0.1)
    train = [i for i, s in enumerate(split) if s == "train"]
    answers = [rows[i]["response"] for i in train]
    random.Random(13).shuffle(answers)
    for i, answer in zip(train, answers, strict=True):
        rows[i] = {**rows[i], "response": answer}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def failure(result) -> str:
    [event] = [e for e in result.all_events if e.is_step_failure]
    return event.event_specific_data.error.message


def report(result) -> dict:
    [event] = result.asset_materializations_for_node("eval_report")
    return {k: v.value for k, v in event.metadata.items()}


def test_first_model_then_a_regression_is_blocked_then_a_person_approves(run_path, resources,
                                                                          tmp_path):
    engine = resources["database"].engine()
    first = run_path("synthetic")
    assert first.success, failure(first)
    first_report = report(first)
    assert first_report["champion_version"] == "none (first model)"
    assert first_report["candidate_token_f1"] >= MIN_TOKEN_F1
    champion = registry.production(engine)
    assert champion.version == first_report["candidate_version"] and champion.approver == "policy"

    shuffled = shuffled_answers_file(tmp_path / "shuffled.jsonl")
    for _ in range(2):  # blocked every time, and production stays the champion
        regression = run_path(shuffled)
        assert not regression.success
        message = failure(regression)
        assert "rejected: token_f1 0." in message and "is below the threshold 0.8000 (gap" in message
        assert "vs champion (bootstrap 95% lower bound)" in message
        assert not regression.asset_materializations_for_node("approved_model")
        assert registry.production(engine).version == champion.version
    rejected = report(regression)["candidate_version"]
    assert registry.get(engine, rejected).stage == "rejected"

    # Another seed: as good as the champion within the default margin, so it waits for a person.
    waiting = run_path("synthetic", seed=1, mode="human")
    assert "awaits a person: run `llmops models approve" in failure(waiting)
    candidate = report(waiting)["candidate_version"]
    assert registry.get(engine, candidate).stage == "candidate"
    # The person approves in the launchpad (the CLI's `llmops models approve` is in test_registry).
    approved = run_path("synthetic", mode="human", selection=[approved_model],
                        approve_version=candidate, approver="alice")
    assert approved.success, failure(approved)
    assert registry.production(engine).approver == "alice"
    transitions = [(e["version"], e["to_stage"]) for e in registry.audit_log(engine)]
    assert (champion.version, "production") in transitions and (rejected, "rejected") in transitions
    assert transitions[-2:] == [(candidate, "production"), (champion.version, "archived")] or \
        transitions[-2:] == [(champion.version, "archived"), (candidate, "production")]
