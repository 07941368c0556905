"""The code location: Definitions load, and the workspace loads in a real dagster-webserver whose
instance stores runs and events in the embedded PostgreSQL."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg

from llmops_dagster.definitions import defs
from llmops_dagster.infra.instance import prepare_dagster_home
from llmops_dagster.training.launch import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPECTED_ASSETS = {"raw_examples", "validated_dataset", "prompt_set", "dataset_embeddings"}


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert EXPECTED_ASSETS <= keys
    assert defs.resolve_job_def("main")
    retrain = {k.to_user_string() for k in defs.resolve_job_def("retrain").asset_layer.selected_asset_keys}
    assert {"feedback_table", "validated_dataset", "finetuned_checkpoint", "serving_deployment"} <= retrain
    assert "raw_examples" not in retrain


def test_every_asset_has_a_code_version_an_owner_a_stage_and_a_description():
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        name = key.to_user_string()
        assert node.code_version, f"{name} has no code version"
        assert node.owners and all(o.startswith("team:") for o in node.owners), name
        assert node.tags.get("llmops/stage") == node.group_name, name
        assert node.description and len(node.description) > 30, f"{name} says too little of itself"


def test_the_loop_is_visible_in_the_graph():
    """Production traffic (observed) feeds feedback_table; drift depends on both ends it compares."""
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
               for k in graph.get_all_asset_keys()}
    assert graph.get(dg.AssetKey("production_traffic")).is_observable
    assert "production_traffic" in parents["feedback_table"]
    assert {"production_traffic", "dataset_embeddings"} <= parents["production_drift"]


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_workspace_loads_in_the_webserver(platform_db):
    env = {**os.environ, **prepare_dagster_home(platform_db)}
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-w", "workspace.yaml",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        nodes = None
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                answer = graphql(port, "{ assetNodes { assetKey { path } groupName } }")
                nodes = answer.get("data", {}).get("assetNodes")
                if nodes:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert nodes, "the webserver did not serve the asset graph within 120 s"
        groups = {node["assetKey"]["path"][-1]: node["groupName"] for node in nodes}
        assert EXPECTED_ASSETS <= set(groups)
        assert groups["validated_dataset"] == "dataset" and groups["prompt_set"] == "prompts"
        storage = graphql(port, "{ instance { info } }")["data"]["instance"]["info"]
        assert "PostgresRunStorage" in storage
        [repository] = graphql(port, "{ repositoriesOrError { ... on RepositoryConnection { nodes { "
                               "sensors { name sensorState { status } } "
                               "schedules { name cronSchedule executionTimezone scheduleState { status } } "
                               "} } } }")["data"]["repositoriesOrError"]["nodes"]
        sensors = {s["name"]: s["sensorState"]["status"] for s in repository["sensors"]}
        assert sensors == {"feedback_sensor": "RUNNING", "drift_sensor": "RUNNING",
                           "rollback_guard": "RUNNING", "serving_reconciler": "RUNNING",
                           "traffic_observation": "RUNNING"}
        [schedule] = repository["schedules"]
        assert (schedule["name"], schedule["cronSchedule"], schedule["scheduleState"]["status"]) == (
            "nightly_retrain", "0 2 * * *", "RUNNING")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_nightly_retrain_timezone_is_configurable():
    from schedules.automation import nightly_retrain_schedule

    schedule = nightly_retrain_schedule("Europe/Paris")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 2 * * *", "Europe/Paris")
