"""The complaint slice and promotion only on improvement: the slice's metrics and examples and the
policy's rule as pure functions; the approval flow on a database of this test's own (reports stored
for real, no models); then eval_report and approved_model on the session's trained default model
against a candidate with the same weights under another version, with counted down-votes of
production's real answers: "no improvement", rejected in the registry, production unchanged.

Touches: databases of this test's own on the session's PostgreSQL (the last test a copy of the
served template's, and a copy of its Dagster instance); no Ray, no training beyond the session's
served_template."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa

from llmops_dagster.evaluation import complaints, scoring
from llmops_dagster.evaluation.complaints import ComplaintExample, Complaints
from llmops_dagster.governance import approval, policy, registry
from resources.loop_settings import LoopSettings


def example(downvoted: str, correction: str | None = None, prompt: str = "q") -> ComplaintExample:
    return ComplaintExample(feedback_id=1, prompt=prompt, downvoted=downvoted, correction=correction)


# --- pure: metrics, examples, rule ---------------------------------------------------------------

def test_metrics_count_repeats_corrections_and_fixes():
    examples = [example("ships today"), example("ships today", "refund in 5 days"),
                example("no idea", "refund in 5 days"), example("wrong")]
    answers = [" Ships  Today", "refund in 5 days", "something else", "right"]
    assert complaints.slice_metrics(examples, answers) == {
        # normalized: case and whitespace do not make a different answer
        "repeats_downvoted": 0.25,
        "gives_correction": 0.5,  # of the 2 corrected examples
        "fixed": 0.5,  # the correction given, and "right" where no correction is known
    }
    assert complaints.slice_metrics([example("a")], ["b"])["gives_correction"] is None
    assert complaints.slice_metrics([], []) == {"repeats_downvoted": None, "gives_correction": None,
                                                "fixed": None}
    with pytest.raises(ValueError, match="1 answers for 2 complaint examples"):
        complaints.slice_metrics([example("a"), example("b")], ["a"])


def test_examples_leave_out_trained_prompts_and_keep_one_per_prompt():
    rows = pd.DataFrame([
        {"feedback_id": 9, "prompt": "Where is A1?", "context": None, "answer": "x", "correction": None},
        {"feedback_id": 8, "prompt": "trained   ON", "context": None, "answer": "y", "correction": "z"},
        {"feedback_id": 7, "prompt": "where is a1?", "context": None, "answer": "x", "correction": None},
        {"feedback_id": 6, "prompt": "Refund?", "context": None, "answer": "w", "correction": "  "},
    ])
    render = lambda prompt, context: f"Customer: {prompt}\nAssistant:"  # noqa: E731
    examples, trained_on = complaints.select_examples(
        rows, render, {scoring.normalize_answer("Customer: trained on\nAssistant:")})
    assert trained_on == 1
    # newest first; "where is a1?" renders to the same normalized prompt as "Where is A1?"
    assert [(e.feedback_id, e.correction) for e in examples] == [(9, None), (6, None)]
    assert examples[0].prompt == "Customer: Where is A1?\nAssistant:"


def stored_slice(candidate_fixed: float | None, champion_fixed: float | None, examples: int = 10) -> dict:
    metric = lambda fixed: None if fixed is None else {  # noqa: E731
        "repeats_downvoted": 0.0, "gives_correction": None, "fixed": fixed}
    return {**complaints.EMPTY, "examples": examples, "champion_version": "prod",
            "metrics": {"candidate": metric(candidate_fixed), "champion": metric(champion_fixed)}}


@pytest.mark.parametrize(("candidate", "champion", "examples", "improved", "reason"), [
    (0.5, 0.3, 10, True, "fixed 0.5000 (candidate) vs 0.3000 (champion) on 10 complaint examples"),
    (0.4, 0.3, 10, True, "+0.1000, at least min_complaint_improvement 0.1000"),
    (0.35, 0.3, 10, False, "no improvement: fixed 0.3500 (candidate) vs 0.3000"),
    (0.3, 0.3, 10, False, "no improvement: "),
    (1.0, 0.0, 4, False, "no improvement: no new signal: 4 complaint examples"),
    (1.0, 0.0, 0, False, "no improvement: no new signal: 0 complaint examples"),
    (1.0, None, 10, False, "no improvement: the champion was not scored"),
])
def test_improvement_rule(candidate, champion, examples, improved, reason):
    verdict = policy.improvement(policy.Policy(), stored_slice(candidate, champion, examples))
    assert verdict.improved is improved and reason in verdict.reason
    assert verdict.reason.startswith("no improvement:") is not improved
    assert verdict.check["passed"] is improved
    assert verdict.figures["complaint_examples"] == examples


def test_a_report_stored_before_the_complaint_slice_reads_as_one_without_examples():
    assert complaints.read_slice({}) == complaints.EMPTY
    assert complaints.read_slice(None)["examples"] == 0
    stored = {"ci_low": 0.1, complaints.COMPLAINT_SLICE: stored_slice(0.5, 0.1)}
    trusted, _ = scoring.read_comparison(stored)
    assert trusted == {"ci_low": 0.1}  # the slice is not a key of the trusted bootstrap
    assert complaints.read_slice(stored)["examples"] == 10
    assert "difference +0.4000" in complaints.figures_text(complaints.read_slice(stored))
    assert "| fixed" in complaints.metrics_markdown(complaints.read_slice(stored))


def test_the_loops_retrains_require_improvement():
    from schedules.automation import nightly_retrain_schedule

    wanted = {"require_improvement": True}
    for settings in (LoopSettings(), LoopSettings(retrain_warm_start=False)):
        assert settings.retrain_run_config()["ops"]["approved_model"]["config"] == wanted
    assert "finetuned_checkpoint" in LoopSettings().retrain_run_config()["ops"]
    assert "finetuned_checkpoint" not in LoopSettings(retrain_warm_start=False).retrain_run_config()["ops"]
    [request] = nightly_retrain_schedule().evaluate_tick(dg.build_schedule_context()).run_requests
    assert request.run_config["ops"]["approved_model"]["config"] == wanted
    from assets.governance import ApprovalConfig

    assert ApprovalConfig().require_improvement is False  # a person's own materialization


def test_evaluate_scores_candidate_and_champion_on_the_complaints(tiny_model, tmp_path):
    """A tiny model as candidate, champion and base: only candidate and champion answer the
    complaint examples, and the slice travels inside the stored comparison."""
    record = {"prompt": "Customer: where is order A10001? Assistant:",
              "completion": " order A10001 ships today.", "slice": "order_status", "source_row": 0,
              "feedback_id": None}
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps(record) + "\n", encoding="utf-8")
    path = str(tiny_model)
    asked = Complaints(champion_version="prod", trained_on=3, examples=[
        example("order A10002 ships today.", prompt="Customer: where is order A10002? Assistant:"),
        example("no", "order A10003 ships today.", prompt="Customer: where is order A10003? Assistant:")])
    report = scoring.evaluate({"candidate": path, "champion": path, "base": path}, eval_file,
                              max_examples=1, max_new_tokens=4, seq_len=48, bootstrap_samples=20, seed=0,
                              complaints=asked)
    stored = complaints.read_slice(json.loads(json.dumps(report.stored_comparison())))
    assert stored["examples"] == 2 and stored["corrected"] == 1 and stored["trained_on"] == 3
    assert set(stored["metrics"]) == {"candidate", "champion"}
    assert stored["metrics"]["candidate"] == stored["metrics"]["champion"]
    assert report.complaint_generation_s > 0
    summary = scoring.report_summary(report, batch_size=16)
    assert summary["complaint_slice_examples"] == 2 and "| fixed" in summary["complaint_slice_metrics"]
    without = scoring.evaluate({"candidate": path}, eval_file, max_examples=1, max_new_tokens=4,
                               seq_len=48, bootstrap_samples=20, seed=0)
    assert complaints.COMPLAINT_SLICE not in without.stored_comparison()


# --- the approval flow on PostgreSQL, reports stored for real ------------------------------------

def stored_report(engine, candidate_version: str, complaint_slice: dict | None) -> dict:
    frame = pd.DataFrame([{"slice": "all", "exact_match": 1.0, "token_f1": 1.0, "latency_ms": 1.0,
                           "prediction": "x"}] * 4)
    scores = {role: scoring.ModelScores(role, "-", frame, loss=0.1) for role in ("candidate", "champion")}
    report = scoring.EvalReport(scores=scores, comparison=scoring.compare(scores, 50, 0),
                                complaint_slice=complaint_slice)
    report_id = scoring.store_report(engine, report, candidate_version, "prod", "d1", "p1")
    return scoring.load_report(engine, report_id)


def candidate(version: str):
    return SimpleNamespace(version=version, dataset_version="d1", prompt_set_version="p1",
                           base_model_version="b1", checkpoint_path="-", adapter_path="-",
                           merged_model_path="-", train_config=lambda: {})


@pytest.fixture
def engine(fresh_database):
    engine = fresh_database.engine()
    report = stored_report(engine, "prod", None)
    registry.register_candidate(engine, version="prod", dataset_version="d1", prompt_set_version="p1",
                                base_model_version="b1", checkpoint_path="-", adapter_path="-",
                                merged_model_path="-", train_config={}, eval_report_id=report["id"])
    registry.promote(engine, "prod", actor="test", reason="setup")
    return engine


def approve(engine, version: str, complaint_slice: dict | None, require_improvement: bool = True,
            **rules):
    report = stored_report(engine, version, complaint_slice)
    return approval.approve(engine, approval.ApprovalRequest(require_improvement=require_improvement),
                            policy.Policy(**{"min_token_f1": 0.5, **rules}), candidate(version), report, [])


def test_no_improvement_rejects_the_candidate_and_keeps_production(engine):
    outcome = approve(engine, "v-same", stored_slice(0.3, 0.3))
    assert outcome.change == approval.NO_IMPROVEMENT and outcome.version.version == "prod"
    assert outcome.reason.startswith("no improvement: fixed 0.3000 (candidate) vs 0.3000")
    assert outcome.figures["fixed_difference"] == 0.0 and outcome.candidate == "v-same"
    assert registry.production(engine).version == "prod"
    rejected = registry.get(engine, "v-same")
    assert rejected.stage == "rejected" and rejected.reason.startswith("no improvement:")
    assert outcome.decision.checks[-1]["rule"] == "fixed vs champion on the complaint slice"

    quiet = approve(engine, "v-quiet", stored_slice(1.0, 0.0, examples=2))  # no new signal
    assert "no new signal" in quiet.reason and registry.get(engine, "v-quiet").stage == "rejected"
    old = approve(engine, "v-old-report", None)  # a report without the slice: no signal either
    assert old.change == approval.NO_IMPROVEMENT and registry.production(engine).version == "prod"


def test_an_improvement_is_promoted_and_a_persons_run_needs_none(engine):
    outcome = approve(engine, "v-better", stored_slice(0.6, 0.2))
    assert outcome.change == "promoted" and registry.production(engine).version == "v-better"
    person = approve(engine, "v-person", stored_slice(0.2, 0.2), require_improvement=False)
    assert person.change == "promoted" and registry.production(engine).version == "v-person"


def test_the_other_rules_still_apply_and_production_itself_is_no_improvement(engine):
    with pytest.raises(approval.ApprovalRefused, match="rejected: token_f1 1.0000 is below"):
        approve(engine, "v-bad", stored_slice(0.9, 0.0), min_token_f1=1.5)
    assert registry.get(engine, "v-bad").stage == "rejected"
    same = approve(engine, "prod", stored_slice(0.3, None))
    assert same.change == approval.NO_IMPROVEMENT and same.version.stage == "production"
    assert same.reason.startswith("no improvement: the candidate is the production version prod")
    assert registry.production(engine).version == "prod"
    assert approve(engine, "prod", None, require_improvement=False).change == \
        "no change (already production)"


def test_a_slice_measured_on_another_production_is_refused_without_rejecting(engine):
    stale = {**stored_slice(0.9, 0.0), "champion_version": "older"}
    with pytest.raises(approval.ApprovalRefused, match="measured the complaint slice on older"):
        approve(engine, "v-stale", stale)
    assert registry.get(engine, "v-stale").stage == "candidate"


# --- real models: the session's default model against itself ------------------------------------

def production_answers(engine, version: registry.ModelVersion, prompts: list[str]) -> list[str]:
    """The answers `version` gives, as the serving app makes them (rendered, greedy, stripped)."""
    from llmops_dagster import generation
    from llmops_dagster.prompts import templates
    from llmops_dagster.prompts.rendering import render_prompt
    from llmops_dagster.serving.app import storable_answer

    model, tokenizer = scoring.load_model(version.merged_model_path)
    model.eval()
    renderer = templates.recorded_renderer(engine, version.prompt_set_version)
    ids = [generation.prompt_ids(tokenizer, render_prompt(renderer, p, None, tokenizer),
                                 version.train_config["seq_len"]) for p in prompts]
    answers = generation.greedy_batch(model, tokenizer, ids, [scoring.EvalSettings.max_new_tokens] * len(ids))
    return [storable_answer(a).strip() for a in answers]


def split_prompts() -> dict[str, list[tuple[str, str]]]:
    """(prompt, reference answer) of the default data, by the split the dataset assigns it."""
    from llmops_dagster.dataset.synthetic_data import generate_examples
    from llmops_dagster.dataset.validation import as_text, assign_split, normalize_text

    rows = generate_examples()
    split = assign_split(normalize_text(as_text(pd.Series([r["prompt"] for r in rows]))), 0.1)
    found = {"train": [], "eval": []}
    for row, part in zip(rows, split, strict=True):
        found[part].append((row["prompt"], row["response"]))
    return found


def down_vote(engine, version: str, prompt: str, answer: str, correction: str | None = None) -> int:
    """An answer as request_log holds it and a counted down-vote of it from an actor of its own."""
    response_id = str(uuid.uuid4())
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO request_log (response_id, model_version, prompt, response, max_new_tokens, "
            "latency_ms) VALUES (:id, :v, :p, :a, 48, 1.0)"),
            {"id": response_id, "v": version, "p": prompt, "a": answer})
        return connection.execute(sa.text(
            "INSERT INTO feedback (response_id, client_id, rating, correction, rater, credential, "
            "counted, actor, review_state) VALUES (:id, 'c', -1, :correction, :rater, "
            "'feedback_token', true, :actor, :review) RETURNING id"),
            {"id": response_id, "correction": correction, "rater": f"token:{response_id}",
             "actor": f"key:person-{uuid.uuid4().hex[:8]}",
             "review": None if correction is None else "pending"}).scalar_one()


def test_a_retrain_with_the_production_weights_is_no_improvement(served_template, platform_db,
                                                                  monkeypatch, tmp_path):
    from assets.evaluation import eval_report
    from assets.governance import approved_model
    from assets.training import finetuned_checkpoint
    from llmops_dagster.feedback import review
    from llmops_dagster.infra.lineage import DATA_VERSION_TAG
    from resources.artifacts import ArtifactStore
    from resources.database import PostgresResource
    from tests.conftest import SERVED_TEMPLATE_DATABASE, new_database, unique, use_database

    use_database(monkeypatch, new_database(platform_db, unique("complaints"),
                                             template=SERVED_TEMPLATE_DATABASE))
    dagster_home = tmp_path / "dagster_home"
    shutil.copytree(served_template["dagster_home"], dagster_home)
    database = PostgresResource()
    engine = database.engine()
    production = registry.production(engine)

    held_out, trained = split_prompts()["eval"][:8], split_prompts()["train"][:2]
    prompts = [p for p, _ in held_out + trained]
    answers = production_answers(engine, production, prompts)
    ids = [down_vote(engine, production.version, p, a) for p, a in zip(prompts, answers, strict=True)]
    accepted = down_vote(engine, production.version, held_out[0][0], answers[0], correction=held_out[0][1])
    review.decide(engine, accepted, "accept", actor="ops-person")
    down_vote(engine, production.version, held_out[1][0], answers[1], correction="pending, not used")
    assert len(ids) == 10

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        # The retrain: a new version whose weights are production's (its own folder's files).
        production_run = Path(production.checkpoint_path).parent
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key=finetuned_checkpoint.key, tags={DATA_VERSION_TAG: "same-weights"},
            metadata={"path": dg.MetadataValue.path(str(production_run))}))
        result = dg.materialize(
            [eval_report, approved_model], instance=instance,
            resources={"database": database, "artifacts": ArtifactStore(root=str(tmp_path / "a"))},
            run_config={"ops": {"eval_report": {"config": {"max_examples": 20}},
                                "approved_model": {"config": {"require_improvement": True}}}})
    assert result.success
    [evaluated] = result.asset_materializations_for_node("eval_report")
    assert evaluated.metadata["complaint_slice_examples"].value == 8
    assert "8 complaint examples (1 with a correction)" in evaluated.metadata["complaint_slice"].value
    assert "repeats_downvoted" in evaluated.metadata["complaint_slice_metrics"].value

    report = scoring.load_report(engine, int(evaluated.metadata["report_id"].value))
    complaint_slice = complaints.read_slice(report["comparison"])
    assert complaint_slice["trained_on"] == 2 and complaint_slice["corrected"] == 1
    assert complaint_slice["champion_version"] == production.version
    metrics = complaint_slice["metrics"]
    assert metrics["candidate"] == metrics["champion"]  # the same weights answer the same
    assert metrics["champion"]["repeats_downvoted"] == 1.0  # its down-voted answers, again
    assert metrics["champion"]["fixed"] == 0.0

    [approved] = result.asset_materializations_for_node("approved_model")
    assert approved.metadata["change"].value == "no improvement"
    assert approved.metadata["version"].value == production.version
    assert approved.tags[DATA_VERSION_TAG] == production.version  # serving_deployment: no change
    assert approved.metadata["reason"].value.startswith("no improvement: fixed 0.0000 (candidate)")
    assert registry.production(engine).version == production.version
    same = registry.get(engine, "same-weights")
    assert same.stage == "rejected" and same.reason.startswith("no improvement:")
    assert json.dumps(report["comparison"])  # stored as JSON, no migration
