"""Preference data from ratings, and the preference step (DPO) in a real fine-tune.

What it touches: the pure pair building and validation of llmops_dagster/feedback/preferences.py;
the DPO loss against the paper's formula; then the test's own database (request_log and feedback
written as the serving app writes them, by five reviewer keys), the preference_dataset asset, and a
tiny fine-tune of 2 DeepSpeed ranks that adds the preference step (its own artifact root).
"""

import json
import math
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import torch

from assets.dataset import raw_examples, validated_dataset
from assets.preferences import preference_dataset
from assets.prompts import prompt_set
from assets.training import base_model, finetuned_checkpoint
from llmops_dagster.feedback import preferences, review
from llmops_dagster.feedback.preferences import PreferenceRules
from llmops_dagster.serving import credentials, traffic_log
from llmops_dagster.training import preference_step
from resources.trainer import TrainerResource
from tests.test_finetune import TINY_BASE, TINY_FINETUNE


def rated(rows: list[tuple]) -> pd.DataFrame:
    """(prompt, answer, rating, correction, review_state, actor) rows as traffic_log.rated_answers."""
    return pd.DataFrame([{"feedback_id": n + 1, "prompt": p, "context": None, "answer": a, "rating": r,
                          "correction": c, "review_state": s, "actor": actor}
                         for n, (p, a, r, c, s, actor) in enumerate(rows)])


def test_pairs_from_accepted_corrections_and_from_up_and_down_votes():
    built = preferences.preference_set(rated([
        ("Where is A1?", "Lost.", -1, "It ships today.", "accepted", "key:a"),
        ("Where is A2?", "Lost.", -1, "It ships today.", "pending", "key:b"),  # not reviewed: no pair
        ("reset hub?", "Unplug it.", -1, None, None, "key:c"),
        ("Reset  HUB?", "Hold 10 s.", 1, None, None, "key:d"),  # same prompt, normalized
        ("Reset hub?", "Hold 10 s.", 1, None, None, "key:e"),
        ("Reset hub?", "Hold 5 s.", 1, None, None, "key:f"),
    ]), PreferenceRules(max_actor_share=1.0))
    pairs = built.pairs.to_dict(orient="records")
    assert [(p["source"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("correction", "It ships today.", "Lost."), ("ratings", "Hold 10 s.", "Unplug it.")]
    assert pairs[0]["feedback_ids"] == [1] and pairs[1]["actors"] == ["key:c", "key:d", "key:e"]
    assert len(built.singles) == 6 and built.counts()["actors"] == 4


def test_validation_keeps_what_it_rejects_with_a_reason():
    rows = [(f"Where is order A{n}?", "Lost.", -1, f"Order A{n} ships today.", "accepted", "key:loud")
            for n in range(8)]
    rows += [("Where is order B1?", "Lost.", -1, "Mail bob@example.com", "accepted", "key:q"),
             ("Where is order B2?", "Same.", -1, "same.", "accepted", "key:q"),
             ("Where is order B3?", "Lost.", -1, "x" * 30, "accepted", "key:q"),
             ("Where is order A0?", "Lost.", -1, "Order A0 ships today.", "accepted", "key:r")]
    built = preferences.preference_set(rated(rows), PreferenceRules(max_chars=25, max_actor_share=0.2))
    reasons = built.rejected["reason"].tolist()
    assert any("chosen: contains an e-mail address (PII)" in r for r in reasons)
    assert "chosen and rejected are the same answer" in reasons
    assert any(r.startswith("chosen: 30 characters, over max_chars 25") for r in reasons)
    assert "duplicate of an earlier pair" in reasons
    # 8 valid pairs of key:loud: its share is capped at max(1, floor(0.2 * 8)) = 1 pair.
    assert sum(r.startswith("actor key:loud has 1 pairs") for r in reasons) == 7
    assert len(built.pairs) + len(built.rejected) == len(rows)  # nothing dropped silently


def test_dpo_loss_is_the_papers():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -5.0]), torch.tensor([-3.0, -2.5])
    loss, accuracy = preference_step.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    margins = [0.5 * ((-3 + 3.5) - (-4 + 3)), 0.5 * ((-5 + 5) - (-2 + 2.5))]
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 2
    assert float(loss) == pytest.approx(expected) and float(accuracy) == 0.5


@pytest.fixture
def rated_traffic(resources):
    """25 answers to order questions rated down by 5 reviewer keys with corrections (accepted as
    sent): 25 correction pairs from 5 actors."""
    engine = resources["database"].engine()
    for n in range(25):
        if n % 5 == 0:
            _, secret = credentials.create_key(engine, f"reviewer-{n // 5}", "reviewer", created_by="test")
            key = credentials.authenticate(engine, secret)
        response_id = f"00000000-0000-4000-8000-{n:012d}"
        order = f"A{10000 + 37 * n}"
        traffic_log.log_requests(engine, [{"id": response_id, "version": "v0",
                                           "prompt": f"Where is my order {order}?", "response": "No idea.",
                                           "max_new_tokens": 32, "latency": 1.0, "api_key_id": None}])
        correction = f"Order {order} left our warehouse and is on its way."
        traffic_log.store_feedback(engine, traffic_log.Rating(
            response_id=response_id, rating=-1, correction=correction, comment=None, client_id="t",
            credential=credentials.judge_rating(key, response_id, None, None),
            review=review.initial_review(-1, correction, key.name), source_address="127.0.0.1"))
    return engine


def test_a_fine_tune_adds_the_preference_step_on_enough_pairs(resources, instance, rated_traffic):
    all_resources = {**resources, "trainer": TrainerResource()}
    result = dg.materialize(
        [raw_examples, validated_dataset, prompt_set, base_model, preference_dataset, finetuned_checkpoint],
        resources=all_resources, instance=instance,
        run_config={"ops": {"raw_examples": {"config": {"synthetic_rows": 300}},
                            "base_model": {"config": TINY_BASE},
                            "finetuned_checkpoint": {"config": {**TINY_FINETUNE, "preference_steps": 8}}}})
    assert result.success
    [made] = result.asset_materializations_for_node("preference_dataset")
    assert (made.metadata["pairs"].value, made.metadata["actors"].value) == (25, 5)
    pairs = [json.loads(line) for line in
             (Path(made.metadata["path"].value) / preferences.PAIRS_FILE).read_text().splitlines()]
    assert pairs[0]["prompt"].endswith("Assistant:") and pairs[0]["chosen"].startswith(" Order")
    [event] = result.asset_materializations_for_node("finetuned_checkpoint")
    metadata = {k: v.value for k, v in event.metadata.items()}
    assert metadata["preference_steps"] == 8 and metadata["global_step"] == TINY_FINETUNE["max_steps"] + 8
    assert metadata["preference_set_version"] == made.tags["dagster/data_version"]
    summary = json.loads((Path(metadata["path"]) / "summary.json").read_text())
    metrics = (Path(metadata["path"]) / "metrics.jsonl").read_text().splitlines()
    history = [json.loads(line) for line in metrics]
    assert [h["step"] for h in history][-8:] == list(range(17, 25))
    print(f"preference step: chosen preferred on {summary['preference_accuracy']:.0%} of "
          f"{summary['preference_pairs']} pairs; DPO loss {history[-8]['loss']:.3f} -> "
          f"{history[-1]['loss']:.3f}")
    # DPO starts at log 2 (policy = reference) and moves towards the chosen answers.
    assert history[-8]["loss"] == pytest.approx(math.log(2), abs=0.05)
    assert history[-1]["loss"] < history[-8]["loss"] and summary["preference_accuracy"] > 0.5
