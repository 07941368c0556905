"""Dagster in its production shape: the user code in a gRPC code server, dagster-webserver and
dagster-daemon as three separate processes on one PostgreSQL-backed instance, the workspace
(deploy/workspace.yaml) pointing at the code server by host and port.

The main job is launched through the webserver's GraphQL API (`launchRun`): the webserver only
queues it, the daemon's run coordinator dequeues it, and the code server starts the run worker,
which trains, approves and serves a small model. Then the Ray head serving it is lost (its
processes stopped), and `serving_reconciler`, started through GraphQL and evaluated by the daemon,
requests the `deploy` run that serves the registry's production version again.

Touches: a platform database and a Dagster database of its own on the session's server,
DAGSTER_HOME and LLMOPS_HOME (artifacts) under tmp_path, a code server on 127.0.0.1:4071-4079, a
webserver on 127.0.0.1:3071-3079, 2 DeepSpeed ranks, and a Ray head of its own (GCS port
LLMOPS_TEST_SHAPE_RAY_PORT, default 6393; Serve on LLMOPS_TEST_SHAPE_HTTP_PORT, default 8013),
stopped at the end.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml

from llmops_dagster.governance import registry
from llmops_dagster.infra.instance import prepare_dagster_home
from llmops_dagster.serving import ray_cluster
from resources.serving import RayServeResource
from tests.test_listeners import assert_loopback_only, listeners, listing

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOCATION = "llmops_dagster"
REPOSITORY = "__repository__"  # the name Dagster gives the one repository of a Definitions object
CODE_SERVER_PORTS = range(4071, 4080)
WEBSERVER_PORTS = range(3071, 3080)
# A Ray head of this test's own, which it stops on purpose: not the session head's ports (conftest:
# 6391, 8011) nor the two-node cluster's (test_ray_two_nodes.py: 6392, 8012).
GCS_PORT = int(os.environ.get("LLMOPS_TEST_SHAPE_RAY_PORT", "6393"))
HTTP_PORT = int(os.environ.get("LLMOPS_TEST_SHAPE_HTTP_PORT", "8013"))
START_TIMEOUT_S = 240  # code server and webserver: 10-20 s together here, minutes on a swamped machine
RUN_TIMEOUT_S = 600
STOP_TIMEOUT_S = 30

# The real main job, sized down: 300 rows, a 2-layer width-64 model, 16 optimizer steps, 10 eval
# questions, and a policy any trained model passes (the gate itself is tested in test_governance.py).
SMALL_MAIN = {"ops": {
    "raw_examples": {"config": {"synthetic_rows": 300}},
    "base_model": {"config": {"vocab_size": 400, "hidden_size": 64, "intermediate_size": 128,
                              "num_hidden_layers": 2, "num_attention_heads": 4}},
    "finetuned_checkpoint": {"config": {"max_steps": 16, "checkpoint_every": 8, "micro_batch_size": 4,
                                        "seq_len": 64}},
    "eval_report": {"config": {"max_examples": 10, "max_new_tokens": 8}},
    "approved_model": {"config": {"min_token_f1": 0.0, "max_loss": 1000.0}},
}}

LOCATION_STATUS = """query { workspaceOrError { __typename ... on Workspace { locationEntries {
  name locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
RELOAD = """mutation($name: String!) { reloadRepositoryLocation(repositoryLocationName: $name) {
  __typename } }"""
SENSOR = """query($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) {
  __typename ... on Sensor { jobOriginId sensorState { selectorId status } }
  ... on PythonError { message } } }"""
STOP_SENSOR = """mutation($origin: String, $selector: String) {
  stopSensor(jobOriginId: $origin, jobSelectorId: $selector) { __typename
    ... on StopSensorMutationResult { instigationState { status } } ... on PythonError { message } } }"""
START_SENSOR = """mutation($selector: SensorSelector!) { startSensor(sensorSelector: $selector) {
  __typename ... on Sensor { sensorState { status } } ... on PythonError { message } } }"""
LAUNCH_RUN = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) { __typename
  ... on LaunchRunSuccess { run { runId status } } ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message } } } }"""
RUN = """query($id: ID!) { runOrError(runId: $id) { __typename
  ... on Run { status jobName tags { key value } } } }"""
SENSOR_RUNS = """query($tags: [ExecutionTag!]) { runsOrError(filter: {tags: $tags}) { __typename
  ... on Runs { results { runId status jobName tags { key value } } } } }"""
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def first_free_port(ports: range) -> int:
    for port in ports:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail(f"no free port in {ports.start}-{ports.stop - 1} on 127.0.0.1")


class Services:
    """Processes started in a process group each, with a log file each; `stop` ends the groups and
    any descendant that left its group (torchrun's ranks, a run worker)."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder, self.env = folder, env
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *command: str) -> subprocess.Popen:
        with open(self.folder / f"{name}.log", "wb") as log:
            process = subprocess.Popen(command, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT, process_group=0)
        self.started[name] = process
        return process

    def tree(self, name: str) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.started[name].pid)
            return [root, *root.children(recursive=True)]
        return []

    def logs(self) -> str:
        tails = []
        for name in self.started:
            text = (self.folder / f"{name}.log").read_text(errors="replace")
            tails.append(f"--- {name} (exit {self.started[name].poll()}) ---\n{text[-2500:]}")
        return "\n".join(tails)

    def assert_alive(self) -> None:
        dead = [name for name, process in self.started.items() if process.poll() is not None]
        assert not dead, f"{dead} exited:\n{self.logs()}"

    def stop(self) -> list[psutil.Process]:
        """Stop every group; the processes still alive after SIGKILL (none, normally)."""
        descendants = [p for name in self.started for p in self.tree(name)]
        for process in reversed(self.started.values()):  # the daemon first: it launches nothing more
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.started.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for process in self.started.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for process in descendants:
            with contextlib.suppress(psutil.Error):
                process.kill()
        _, alive = psutil.wait_procs(descendants, timeout=STOP_TIMEOUT_S)
        return alive


class Webserver:
    """The webserver's GraphQL API over HTTP, as the UI and any client use it."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/server_info", timeout=5):
                return True
        except OSError:
            return False

    def graphql(self, query: str, **variables) -> dict:
        request = urllib.request.Request(f"{self.url}/graphql", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"query": query, "variables": variables}).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
        assert not body.get("errors"), body["errors"]
        return body["data"]


def wait_for(what: str, condition, services: Services, timeout_s: float, every_s: float = 1):
    deadline = time.monotonic() + timeout_s
    while True:
        services.assert_alive()
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s\n{services.logs()}"
        time.sleep(every_s)


def location_loaded(web: Webserver) -> bool:
    """Whether the webserver has loaded the code location from the code server; reloads it when the
    code server was not answering yet when the webserver first asked."""
    if not web.answers():
        return False
    entries = web.graphql(LOCATION_STATUS)["workspaceOrError"].get("locationEntries") or []
    if [(e["locationOrLoadError"] or {}).get("__typename") for e in entries] == ["RepositoryLocation"]:
        return True
    web.graphql(RELOAD, name=LOCATION)
    return False


def run_status(web: Webserver, run_id: str) -> dict:
    return web.graphql(RUN, id=run_id)["runOrError"]


def event_types(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [record.event_log_entry.dagster_event.event_type_value
            for record in instance.get_records_for_run(run_id, limit=10_000).records
            if record.event_log_entry.dagster_event is not None]


def run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> int:
    """The pid of the process that executed the run, as the code server reported it."""
    for record in instance.get_records_for_run(run_id, limit=10_000).records:
        found = re.fullmatch(r"Started process for run \(pid: (\d+)\)\.", record.event_log_entry.message)
        if found:
            return int(found.group(1))
    raise AssertionError(f"run {run_id} has no 'Started process for run' event")


@pytest.fixture
def platform(fresh_database, dagster_database, tmp_path, monkeypatch):
    """The environment of this test's platform: its databases, DAGSTER_HOME with dagster.yaml as
    `llmops` writes it (PostgreSQL storage, queued run coordinator), its artifact root and Ray ports."""
    monkeypatch.setenv("LLMOPS_HOME", str(tmp_path / "home"))  # artifacts, secrets, the Ray head's folder
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("LLMOPS_SERVE_HTTP_PORT", str(HTTP_PORT))
    monkeypatch.setenv("LLMOPS_RAY_PORT", str(GCS_PORT))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    prepare_dagster_home(fresh_database)
    ray_serve = RayServeResource(http_port=HTTP_PORT, local_port=GCS_PORT)
    yield {"database": fresh_database, "ray_serve": ray_serve}
    stop_ray_head(ray_serve)


def stop_ray_head(ray_serve: RayServeResource) -> int:
    """Stop this test's Ray head (its runs started it) by its processes; this process never
    joined it as a driver, and stays the session head's driver if it is one."""
    return ray_cluster.stop_local_head(ray_serve.local_temp_dir(), ray_serve.local_port)


def test_the_main_job_and_a_sensor_run_through_code_server_webserver_and_daemon(platform, tmp_path):
    code_port, web_port = first_free_port(CODE_SERVER_PORTS), first_free_port(WEBSERVER_PORTS)
    workspace = yaml.safe_load((REPO / "deploy" / "workspace.yaml").read_text())
    [entry] = workspace["load_from"]
    assert entry["grpc_server"]["location_name"] == LOCATION
    entry["grpc_server"].update(host="127.0.0.1", port=code_port)
    (tmp_path / "workspace.yaml").write_text(yaml.safe_dump(workspace))
    workspace_file = str(tmp_path / "workspace.yaml")

    services = Services(tmp_path, dict(os.environ))
    begun = time.monotonic()
    try:
        services.start("code-server", str(BIN / "dagster"), "code-server", "start", "-h", "127.0.0.1",
                       "-p", str(code_port), "-m", "llmops_dagster.definitions", "--location-name",
                       LOCATION, "-d", str(REPO))
        services.start("webserver", str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p",
                       str(web_port), "-w", workspace_file)
        web = Webserver(web_port)
        wait_for("the webserver loading the code server's location", lambda: location_loaded(web),
                 services, START_TIMEOUT_S, every_s=2)

        # Stopped before the daemon's first tick, so that starting it later is evaluated at once
        # (a sensor that has ticked waits its minimum interval, 60 s, after a restart).
        selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY,
                    "sensorName": "serving_reconciler"}
        sensor = web.graphql(SENSOR, selector=selector)["sensorOrError"]
        assert sensor["__typename"] == "Sensor", sensor
        stopped = web.graphql(STOP_SENSOR, origin=sensor["jobOriginId"],
                              selector=sensor["sensorState"]["selectorId"])["stopSensor"]
        assert stopped["instigationState"]["status"] == "STOPPED", stopped
        daemon = services.start("daemon", str(BIN / "dagster-daemon"), "run", "-w", workspace_file)
        print(f"\ncode server and webserver ready, daemon started: {time.monotonic() - begun:.1f} s")

        # Three processes, none the others' child; the code server and the webserver listen on
        # loopback, the daemon nowhere.
        pids = {name: process.pid for name, process in services.started.items()}
        for name in pids:
            assert not {p.pid for p in services.tree(name)[1:]} & set(pids.values()), name
        found = listeners([p for name in pids for p in services.tree(name)])
        print(f"\n{listing(found)}")
        assert_loopback_only(found)
        assert {(x.port, x.pid) for x in found} == {(code_port, pids["code-server"]),
                                                     (web_port, pids["webserver"])}, listing(found)

        # The main job, through the webserver: queued there, started by the daemon.
        launched = web.graphql(LAUNCH_RUN, params={
            "selector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY,
                         "jobName": "main"},
            "runConfigData": SMALL_MAIN,
            "executionMetadata": {"tags": [{"key": "llmops/trigger", "value": "test_production_shape"}]},
        })["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        assert launched["run"]["status"] == "QUEUED"
        started = time.monotonic()
        seen = {name: set() for name in pids}  # every process each service's tree ever had

        def main_finished():
            for name in pids:
                seen[name].update(p.pid for p in services.tree(name))
            status = run_status(web, run_id)["status"]
            return status if status in FINISHED else None

        status = wait_for("the main run", main_finished, services, RUN_TIMEOUT_S)
        print(f"main run {run_id}: {status} in {time.monotonic() - started:.1f} s")
        with dg.DagsterInstance.get() as instance:
            events = event_types(instance, run_id)
            for step in sorted(instance.get_run_step_stats(run_id), key=lambda s: s.start_time or 0):
                print(f"  {step.step_key:28} {(step.end_time or 0) - (step.start_time or 0):6.1f} s")
            assert status == "SUCCESS", f"{events}\n{services.logs()}"
            worker = run_worker_pid(instance, run_id)
        # Queued by the webserver; STARTING is reported by whoever dequeues it: the daemon.
        assert events.index("PIPELINE_ENQUEUED") < events.index("PIPELINE_STARTING") < events.index(
            "PIPELINE_START")
        assert "Launched 1 runs" in (tmp_path / "daemon.log").read_text(errors="replace")
        # The run worker was the code server's child, never the webserver's or the daemon's.
        assert [name for name in pids if worker in seen[name]] == ["code-server"], (worker, seen)
        production = registry.production(platform["database"].engine()).version
        ray_serve = platform["ray_serve"]
        assert ray_serve.served_version() == production

        # The Ray head is lost; the reconciler, evaluated by the daemon, has it served again.
        assert stop_ray_head(ray_serve) > 0
        assert ray_serve.served_version() is None
        restarted = web.graphql(START_SENSOR, selector=selector)["startSensor"]
        assert restarted["sensorState"]["status"] == "RUNNING", restarted
        lost = time.monotonic()

        def sensor_run_finished():
            runs = web.graphql(SENSOR_RUNS, tags=[{"key": "dagster/sensor_name",
                                                   "value": "serving_reconciler"}])
            results = runs["runsOrError"]["results"]
            return results if results and results[0]["status"] in FINISHED else None

        [run] = wait_for("the reconciler's deploy run", sensor_run_finished, services, RUN_TIMEOUT_S)
        print(f"reconciler run {run['runId']} ({run['jobName']}): {run['status']} "
              f"{time.monotonic() - lost:.1f} s after the head was lost")
        tags = {tag["key"]: tag["value"] for tag in run["tags"]}
        assert (run["jobName"], run["status"]) == ("deploy", "SUCCESS"), services.logs()
        assert tags["llmops/trigger"] == "reconcile" and tags["llmops/served"] == "nothing"
        # The daemon's sensor loop launched it; the run queue (the daemon again) started it.
        assert f"Completed launch of run {run['runId']} for serving_reconciler" in (
            tmp_path / "daemon.log").read_text(errors="replace")
        with dg.DagsterInstance.get() as instance:
            assert "PIPELINE_ENQUEUED" in event_types(instance, run["runId"])
        assert ray_serve.served_version() == production
        assert daemon.poll() is None
    finally:
        stopping = time.monotonic()
        left = services.stop()
        print(f"services stopped in {time.monotonic() - stopping:.1f} s")
    assert not left, f"processes left after the services stopped: {left}"
