"""Metrics, the paired bootstrap, the trusted split and the feedback slice, and the approval policy
as pure functions; then evaluate() on a tiny scratch model (no training)."""

import json

import numpy as np
import pandas as pd
import pytest

from llmops_dagster.evaluation import scoring
from llmops_dagster.evaluation.scoring import exact_match, paired_bootstrap, token_f1
from llmops_dagster.governance.policy import Policy, judge
from llmops_dagster.prompts import templates
from llmops_dagster.prompts.rendering import TEMPLATE, PromptRenderer


@pytest.mark.parametrize(
    ("prediction", "reference", "em", "f1"),
    [
        ("Order A1 is cancelled.", "order a1 is  cancelled.", 1.0, 1.0),
        ("Order A1 is cancelled.", "Order A2 is cancelled.", 0.0, 0.8),
        ("", "Order A1 is cancelled.", 0.0, 0.0),
        ("Hold the button", "Hold the button for 5 seconds", 0.0, 2 * 1 * 0.5 / 1.5),
    ],
)
def test_exact_match_and_token_f1(prediction, reference, em, f1):
    assert exact_match(prediction, reference) == em
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_bootstrap_interval_covers_the_true_difference():
    rng = np.random.default_rng(1)
    champion = rng.uniform(0.4, 0.6, size=200)
    same = paired_bootstrap(champion, champion, seed=0)
    assert same["ci_low"] == same["ci_high"] == 0.0
    better = paired_bootstrap(champion + 0.05 + rng.normal(0, 0.02, 200), champion, seed=0)
    assert 0.0 < better["ci_low"] < 0.05 < better["ci_high"] < 0.1
    worse = paired_bootstrap(champion - 0.2, champion, seed=0)
    assert worse["ci_high"] < 0


GOOD = {"token_f1": 0.8, "exact_match": 0.3, "loss": 0.5}


def test_first_model_is_judged_on_thresholds_alone():
    assert judge(Policy(), GOOD, comparison=None).passed
    decision = judge(Policy(min_token_f1=0.9), GOOD, comparison=None)
    assert not decision.passed
    assert decision.failures == ["token_f1 0.8000 is below the threshold 0.9000 (gap 0.1000)"]


def test_a_candidate_worse_than_the_champion_is_blocked_naming_the_gap():
    comparison = {"metric": "token_f1", "mean_difference": -0.1, "ci_low": -0.15, "ci_high": -0.05}
    decision = judge(Policy(margin=0.01), GOOD, comparison)
    assert not decision.passed
    assert decision.failures == [
        "token_f1 vs champion (bootstrap 95% lower bound) -0.1500 is below the threshold -0.0100 "
        "(gap 0.1400)"
    ]
    tie = {"metric": "token_f1", "mean_difference": 0.0, "ci_low": -0.005, "ci_high": 0.005}
    assert judge(Policy(margin=0.01), GOOD, tie).passed


def test_loss_above_threshold_and_failed_upstream_checks_block():
    decision = judge(Policy(max_loss=0.4), GOOD, None, upstream_checks_failed=["validated_dataset:q"])
    assert decision.failures == [
        "loss 0.5000 is above the threshold 0.4000 (gap 0.1000)",
        "upstream blocking check failed: validated_dataset:q",
    ]


HOLDS = {"metric": "token_f1", "mean_difference": 0.0, "ci_low": -0.005, "ci_high": 0.005}
REGRESSES = {"metric": "token_f1", "mean_difference": -0.4, "ci_low": -0.5, "ci_high": -0.3}
FEEDBACK_RULE = "token_f1 vs champion on the feedback slice (bootstrap 95% lower bound)"


def test_a_feedback_slice_regression_is_informational_under_the_default_policy():
    decision = judge(Policy(), GOOD, HOLDS, feedback_comparison=REGRESSES)
    assert decision.passed
    [check] = [c for c in decision.checks if c["rule"] == FEEDBACK_RULE]
    assert check == {"rule": FEEDBACK_RULE, "value": -0.5, "threshold": "informational", "passed": True}


def test_a_feedback_slice_regression_blocks_when_the_policy_asks_for_both():
    strict = Policy(require_trusted_no_regression=False)
    decision = judge(strict, GOOD, HOLDS, feedback_comparison=REGRESSES)
    assert decision.failures == [f"{FEEDBACK_RULE} -0.5000 is below the threshold -0.0200 (gap 0.4800)"]
    assert judge(strict, GOOD, HOLDS, feedback_comparison=HOLDS).passed
    assert judge(strict, GOOD, HOLDS, feedback_comparison=None).passed  # no feedback examples
    # The trusted split gates either way.
    assert not judge(Policy(), GOOD, REGRESSES, feedback_comparison=HOLDS).passed


# The average hides one slice the model gets wrong (cities copied 0.37 of the time, issue 28).
SLICES = {"order_status": {"exact_match": 1.0, "token_f1": 1.0},
          "change_address": {"exact_match": 0.37, "token_f1": 0.98},
          "cancel_order": {"exact_match": 0.95, "token_f1": 0.99}}


def test_the_lowest_slice_gates_only_when_the_policy_asks():
    assert scoring.lowest_slice(SLICES) == ("change_address", 0.37)
    assert scoring.lowest_slice_text(SLICES) == "change_address: exact match 0.3700"
    assert scoring.lowest_slice({}) is None
    assert judge(Policy(), GOOD, None, candidate_slices=SLICES).passed  # off by default
    decision = judge(Policy(min_slice_exact_match=0.8), GOOD, None, candidate_slices=SLICES)
    assert decision.failures == ["exact_match on the lowest slice (change_address) 0.3700 is below the "
                                 "threshold 0.8000 (gap 0.4300)"]
    assert judge(Policy(min_slice_exact_match=0.3), GOOD, None, candidate_slices=SLICES).passed
    assert judge(Policy(min_slice_exact_match=0.8), GOOD, None, candidate_slices=None).passed


def accepted(feedback_ids) -> pd.DataFrame:
    frame = pd.DataFrame({
        "prompt": ["where is A1?", "where is A2?", "cancel A3"],
        "response": ["It ships today.", "It shipped.", "Cancelled."],
        "slice": ["order_status", "order_status", "feedback_correction"],
        "split": ["eval", "eval", "eval"],
        "_row_number": [1, 2, 3],
    })
    if feedback_ids is not None:
        frame["feedback_id"] = pd.array(feedback_ids, dtype="Int64")
    return frame


@pytest.mark.parametrize(
    ("feedback_ids", "written"),
    [([None, None, 7], [None, None, 7]), (None, [None, None, None]), ([None, None, None], [None] * 3)],
    ids=["mixed", "no column", "all trusted"],
)
def test_prompt_set_records_carry_the_feedback_id_as_int_or_null(tmp_path, feedback_ids, written):
    template = PromptRenderer(kind=TEMPLATE, name="t", text="Customer: {{ prompt }}\nAssistant:")
    records = templates.render_records(template, accepted(feedback_ids))
    templates.write_prompt_set(tmp_path, records, template)
    text = (tmp_path / "eval.jsonl").read_text(encoding="utf-8")
    assert "NaN" not in text and "<NA>" not in text
    assert [json.loads(line)["feedback_id"] for line in text.splitlines()] == written


def test_max_examples_counts_trusted_records_and_the_feedback_slice_has_its_own_cap():
    records = [{"prompt": str(i), "feedback_id": 100 + i if i % 3 == 0 else None} for i in range(10)]
    records.append({"prompt": "written before feedback_id existed"})
    trusted, feedback = scoring.split_eval_records(records, max_examples=4, max_feedback_examples=2)
    assert [r["prompt"] for r in trusted] == ["1", "2", "4", "5"]
    assert [r["feedback_id"] for r in feedback] == [100, 103]
    trusted, feedback = scoring.split_eval_records(records, max_examples=100, max_feedback_examples=100)
    assert len(trusted) == 7 and len(feedback) == 4


def test_a_report_stored_before_the_feedback_slice_reads_as_one_without_it():
    assert scoring.read_comparison({}) == (None, {"examples": 0, "metrics": {}, "comparison": None})
    assert scoring.read_comparison(HOLDS) == (HOLDS, {"examples": 0, "metrics": {}, "comparison": None})


def test_evaluate_scores_the_feedback_slice_apart_and_the_loss_on_the_scored_records(tiny_model,
                                                                                    tmp_path):
    from llmops_dagster.training.examples import encode_records, evaluate_loss

    def record(i: int, feedback_id: int | None) -> dict:
        answer = f" order A{10000 + i} ships today." if feedback_id is None else " Refunds take 5 days."
        return {"prompt": f"Customer: where is order A{10000 + i}? Assistant:", "completion": answer,
                "slice": "order_status", "source_row": i, "feedback_id": feedback_id}

    # Feedback records first: a prefix of the file is not the trusted records.
    records = [record(i, 500 + i) for i in range(3)] + [record(i, None) for i in range(3, 8)]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    path = str(tiny_model)
    models = {"candidate": path, "champion": path, "base": path}
    report = scoring.evaluate(models, eval_file, max_examples=4, max_new_tokens=4, seq_len=48,
                              bootstrap_samples=50, seed=0, max_feedback_examples=2)

    assert report.metrics()["candidate"]["examples"] == 4
    assert set(report.feedback_metrics()) == set(models) and report.feedback_examples() == 2
    assert report.comparison["examples"] == 4 and report.feedback_comparison["examples"] == 2
    model, tokenizer = scoring.load_model(path)
    trusted_loss = evaluate_loss(model, encode_records(records[3:7], tokenizer, 48))
    assert report.scores["candidate"].loss == pytest.approx(trusted_loss)
    assert report.feedback_scores["candidate"].loss != pytest.approx(trusted_loss)

    comparison, feedback_slice = scoring.read_comparison(json.loads(json.dumps(report.stored_comparison())))
    assert comparison == report.comparison
    assert feedback_slice == {"examples": 2, "metrics": report.feedback_metrics(),
                              "comparison": report.feedback_comparison}


def test_batched_scoring_gives_the_answers_of_one_at_a_time(tiny_model):
    """Prompts of many lengths, left-padded in batches of 8 (sorted by length, then put back in
    record order): every greedy answer equals the one the model gives the prompt alone."""
    records = [{"prompt": f"Customer: {'please ' * (i % 9)}where is order A{10000 + i}? Assistant:",
                "completion": f" order A{10000 + i} ships today.", "slice": "order_status"}
               for i in range(40)]
    import torch

    model, tokenizer = scoring.load_model(str(tiny_model))
    torch.manual_seed(0)
    with torch.no_grad():  # weights large enough that each prompt gets an answer of its own
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    loaded = (model, tokenizer)
    alone = scoring.score_model("m", str(tiny_model), records, 12, 48, loaded, batch_size=1)
    batched = scoring.score_model("m", str(tiny_model), records, 12, 48, loaded, batch_size=8)
    assert batched.per_example["prediction"].tolist() == alone.per_example["prediction"].tolist()
    assert len(set(alone.per_example["prediction"])) > 1  # answers that differ: order is checked
    assert batched.summary()["token_f1"] == alone.summary()["token_f1"]
    assert batched.generation_s > 0 and batched.summary()["generation_s"] >= 0
