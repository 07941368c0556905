"""The loop under live traffic, on real Ray Serve, DeepSpeed and PostgreSQL: while about 2,000
requests arrive at about 20 per second, negative feedback with corrections makes feedback_sensor
request a retraining; a reviewer accepts all corrections but one; the run curates the feedback,
trains a new model on data that includes the accepted corrections (and `llmops trace` of its answers
names each one's feedback id, key and reviewer), approves it under the default policy and rolls it
out; then a registry rollback redeploys the previous version. Not one request may fail.

Touches: the session's default model served from a database of this test's own (a copy of the
template), a fresh Dagster instance and artifact root; 127.0.0.1 only."""

import json
import urllib.request

import dagster as dg
import sqlalchemy as sa

from assets.dataset import raw_examples, validated_dataset
from assets.evaluation import eval_report
from assets.feedback import feedback_table
from assets.governance import approved_model
from assets.prompts import prompt_set
from assets.serving import serving_deployment
from assets.training import base_model, finetuned_checkpoint
from llmops_dagster import cli
from llmops_dagster.dataset.dataset_store import read_accepted
from llmops_dagster.governance import registry
from llmops_dagster.serving import credentials
from resources.loop_settings import LoopSettings
from schedules.automation import feedback_sensor
from tests.conftest import UNLIMITED
from tests.traffic import Traffic

RATE_PER_S = 20
MIN_REQUESTS = 2000


def post(url: str, body: dict, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def question(url: str):
    """One question a call: which model version answered it, or why it failed."""

    def one(number: int) -> dict:
        try:
            answer = post(f"{url}/v1/generate",
                          {"prompt": f"Where is my order A{10000 + number % 90000}?", "max_new_tokens": 8})
            return {"result": "ok", "version": answer["model_version"]}
        except Exception as error:  # every failure is counted, none is raised
            return {"result": "failed", "error": repr(error)}
    return one


def materialize(served_model, assets, ops=None, tags=None):
    all_assets = [feedback_table, raw_examples, validated_dataset, prompt_set, base_model,
                  finetuned_checkpoint, eval_report, approved_model, serving_deployment]
    ops = dict(ops or {})
    if serving_deployment in assets:  # the load comes from one address: no rate limit on it
        serving = ops.get("serving_deployment", {}).get("config", {})
        ops["serving_deployment"] = {"config": {**UNLIMITED, **serving}}
    result = dg.materialize(all_assets, selection=assets, resources=served_model["resources"],
                            instance=served_model["instance"], run_config={"ops": ops},
                            tags=tags)
    assert result.success
    return result


def test_feedback_retrains_and_a_new_model_rolls_out_under_load_then_rolls_back(served_model, capsys):
    url, engine, first = served_model["url"], served_model["engine"], served_model["version"]
    load = Traffic(question(url), RATE_PER_S, workers=16, min_requests=MIN_REQUESTS,
                   max_requests=6 * MIN_REQUESTS).start()

    # Five shop front-ends ask with their client keys and pass each answer's feedback token to the
    # person, who rates it down with a correction; a reviewer accepts all but one. A token's rating
    # belongs to the key that asked: five actors, at most 2 votes each.
    client_keys = [credentials.create_key(engine, f"shop-frontend-{n}", "client", created_by="test")[1]
                   for n in range(5)]
    _, reviewer_key = credentials.create_key(engine, "alice", "reviewer", created_by="test")
    corrections = {}
    for number in range(9):
        answer = post(f"{url}/v1/generate", {"prompt": f"Hello, please cancel order A5{number}123."},
                      key=client_keys[number % 5])
        correction = f"Order A5{number}123 is cancelled. The payment hold is released within 3 business days."
        stored = post(f"{url}/v1/feedback", {"response_id": answer["response_id"], "rating": -1,
                                             "correction": correction, "feedback_token":
                                             answer["feedback_token"]})
        assert stored["counted"] and stored["review"] == "pending"
        corrections[stored["feedback_id"]] = correction
    rejected = max(corrections)
    for feedback_id in corrections:
        decision = "reject" if feedback_id == rejected else "accept"
        post(f"{url}/v1/reviews/{feedback_id}", {"decision": decision, "note": "checked"}, key=reviewer_key)
    accepted = set(corrections) - {rejected}

    context = dg.build_sensor_context(instance=served_model["instance"], resources={
        "database": served_model["resources"]["database"],
        "loop_settings": LoopSettings(feedback_threshold=len(corrections))})
    request = feedback_sensor(context)
    assert isinstance(request, dg.RunRequest) and request.run_key.startswith("feedback-")
    # This test's own instance has no history: the retrain runs from raw_examples on.
    result = materialize(served_model, [feedback_table, raw_examples, validated_dataset, prompt_set,
                                        base_model, finetuned_checkpoint, eval_report, approved_model,
                                        serving_deployment],
                         tags=request.tags, ops={"eval_report": {"config": {"max_examples": 40}}})
    [served] = result.asset_materializations_for_node("serving_deployment")
    second = served.metadata["model_version"].value
    assert second != first and registry.production(engine).version == second
    assert post(f"{url}/v1/generate", {"prompt": "Hi", "max_new_tokens": 4})["model_version"] == second
    new_model = registry.get(engine, second)
    with engine.connect() as connection:
        dataset_path = connection.execute(
            sa.text("SELECT path FROM dataset_versions WHERE version = :v"),
            {"v": new_model.dataset_version}).scalar_one()
    rows = read_accepted(dataset_path)
    assert set(rows["feedback_id"].dropna().astype(int)) == accepted  # reviewed corrections only

    # The new model's answers trace back to the corrections behind its training rows, each with
    # its feedback id, the key it came with and its reviewer.
    response_id = post(f"{url}/v1/generate", {"prompt": "Hello, please cancel order A50123."})["response_id"]
    assert cli.main(["trace", response_id]) == 0
    printed = capsys.readouterr().out
    train_ids = set(rows[rows["split"] == "train"]["feedback_id"].dropna().astype(int))
    assert train_ids
    for feedback_id in train_ids:
        assert (f"feedback {feedback_id:>6}" in printed and "rater key:shop-frontend" in printed
                and "accepted by key:alice" in printed), printed

    # The rollback as rollback_guard's run applies it: registry and redeploy in one run. Run again
    # (a retry), it changes nothing: the registry is left alone and the served model stays.
    rollback = {"serving_deployment": {"config": {"rollback_from": second,
                                                  "rollback_reason": "rollout drill"}}}
    materialize(served_model, [serving_deployment], ops=rollback)
    assert registry.production(engine).version == first
    assert post(f"{url}/v1/generate", {"prompt": "Hi", "max_new_tokens": 4})["model_version"] == first
    retried = materialize(served_model, [serving_deployment], ops=rollback)
    [event] = retried.asset_materializations_for_node("serving_deployment")
    assert event.metadata["change"].value == "no change (already served)"
    assert [e["to_stage"] for e in registry.audit_log(engine, second)].count("archived") == 1

    load.finish()
    failures = [o for o in load.outcomes if o["result"] != "ok"]
    assert len(load.outcomes) >= MIN_REQUESTS
    assert failures == [], f"{len(failures)} of {len(load.outcomes)} requests failed: {failures[:3]}"
    versions = [o["version"] for o in load.outcomes]
    assert second in versions and versions[-1] == first  # served the new model, then the old again
