"""Metrics, the paired bootstrap and the approval policy as pure functions (no models)."""

import numpy as np
import pytest

from llmops_dagster.evaluation.scoring import exact_match, paired_bootstrap, token_f1
from llmops_dagster.governance.policy import Policy, judge


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
