"""Services stop cleanly: `llmops ui` started in the background (SIGINT ignored, as a shell's `&` does)
stops with its webserver, daemon and code server on SIGTERM; `llmops serve stop` with no local Ray head.
`llmops ui` listens on 127.0.0.1 only (its webserver; code servers on Unix sockets), and by default it
is read-only: a GraphQL launchRun is refused and creates no run.

Touches: a real `dagster dev` on a free port, its instance in a database of its own on the session's
embedded PostgreSQL (nothing under the developer's .llmops); no Ray head is started here.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import dagster as dg
import psutil
import pytest

from llmops_dagster.infra import database
from llmops_dagster.training.launch import free_port
from tests.test_listeners import assert_loopback_only, listeners, listing

LLMOPS = str(Path(sys.executable).parent / "llmops")
START_TIMEOUT_S = 240  # the webserver takes 20-60 s to start on a 2-core machine, more under load
STOP_TIMEOUT_S = 60


def _answers(port: int) -> bool:
    """Whether the webserver answers HTTP (any status) on 127.0.0.1:`port`."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def http(url: str, body: dict | None = None) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) of a GET, or of a JSON POST when `body` is given; redirects not followed."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *_):
            return None

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=60) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


# The reproduction of issue 22: a run of the main job with run config that carries a command.
LAUNCH_RUN = """mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) { __typename ... on UnauthorizedError { message } } }"""
LAUNCH_PARAMS = {"selector": {"repositoryLocationName": "llmops_dagster", "repositoryName": "__repository__",
                              "jobName": "main"},
                 "runConfigData": {"ops": {"training_run": {"config": {"command": "id > /tmp/owned"}}}}}


def start_ui(arguments: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`llmops ui ARGUMENTS` in a process group of its own (so that group checks do not see pytest),
    with SIGINT ignored as a shell's `&` leaves it; returns once its webserver answers on --port."""
    port = int(arguments[arguments.index("--port") + 1])
    with open(log, "wb") as output:
        ui = subprocess.Popen([LLMOPS, "ui", *arguments], env=env, stdin=subprocess.DEVNULL,
                              stdout=output, stderr=subprocess.STDOUT, process_group=0,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(port):
        if ui.poll() is not None or time.monotonic() > deadline:
            stop_ui(ui, psutil.Process(ui.pid).children(recursive=True) if ui.poll() is None else [])
            pytest.fail(f"no webserver within {START_TIMEOUT_S} s (exit status {ui.returncode}):\n"
                        f"{_log_tail(log)}")
        time.sleep(1)
    return ui


def stop_ui(ui: subprocess.Popen, descendants: list[psutil.Process]) -> None:
    """Kill whatever is left of `llmops ui` (only after a failed assertion: a pass stops it by SIGTERM)."""
    for process in [*descendants, psutil.Process(ui.pid)] if ui.poll() is None else descendants:
        with contextlib.suppress(psutil.Error):
            process.kill()
    ui.wait()


def ui_environment(platform_db, tmp_path) -> dict[str, str]:
    """Environment of a `llmops ui` whose Dagster instance is a database of its own."""
    dagster_url = database.ensure_database(platform_db.admin_url(), f"ui_{uuid.uuid4().hex[:12]}")
    return {**os.environ, "LLMOPS_HOME": str(tmp_path / "home"),
            "DAGSTER_HOME": str(tmp_path / "dagster_home"), "LLMOPS_DAGSTER_DATABASE_URL": dagster_url}


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie (the same process: psutil compares its start time)."""
    with contextlib.suppress(psutil.Error):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False


def _group(pgid: int) -> list[psutil.Process]:
    """Live processes of process group `pgid`."""
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == pgid and _alive(process):
                members.append(process)
    return members


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def test_ui_in_the_background_is_read_only_and_stops_on_sigterm(fresh_database, platform_db, tmp_path,
                                                                  monkeypatch):
    # The Dagster instance in a database of its own; the platform database is fresh_database's.
    env = ui_environment(platform_db, tmp_path)
    port = free_port()
    log = tmp_path / "ui.log"
    ui = start_ui(["--port", str(port)], env, log)
    descendants: list[psutil.Process] = []
    try:
        descendants = psutil.Process(ui.pid).children(recursive=True)
        commands = [" ".join(process.cmdline()) for process in descendants]
        assert any("llmops_dagster.infra.ui webserver" in c and "--read-only" in c
                   for c in commands), commands
        assert any("dagster._daemon" in c for c in commands), commands

        # Read-only: launchRun is refused, the write routes outside GraphQL too, and no run exists.
        status, body, _ = http(f"http://127.0.0.1:{port}/graphql",
                               {"query": LAUNCH_RUN, "variables": {"params": LAUNCH_PARAMS}})
        assert status == 200, body
        assert json.loads(body)["data"]["launchRun"]["__typename"] == "UnauthorizedError", body
        status, body, _ = http(f"http://127.0.0.1:{port}/report_asset_materialization/serving_deployment",
                               {"metadata": {"model_version": "forged"}})
        assert status == 403, body
        monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
        monkeypatch.setenv("LLMOPS_DAGSTER_DATABASE_URL", env["LLMOPS_DAGSTER_DATABASE_URL"])
        with dg.DagsterInstance.get() as instance:
            assert instance.get_runs_count() == 0
            assert not instance.get_latest_materialization_event(dg.AssetKey("serving_deployment"))
        found = listeners([psutil.Process(ui.pid), *descendants])
        print(f"\n{listing(found)}")
        assert_loopback_only(found)
        assert {(x.ip, x.port) for x in found} == {("127.0.0.1", port)}, listing(found)
        groups = {ui.pid} | {os.getpgid(process.pid) for process in descendants}

        started = time.monotonic()
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=STOP_TIMEOUT_S)
        print(f"llmops ui stopped in {time.monotonic() - started:.1f} s with exit status {ui.returncode}")
        assert ui.returncode == 0, _log_tail(log)  # dagster dev's own graceful shutdown, not SIGKILL
        assert not [p for p in descendants if _alive(p)], _log_tail(log)
        assert not [p for pgid in groups for p in _group(pgid)], _log_tail(log)
    finally:  # kills only when an assertion above failed
        stop_ui(ui, descendants)


# Not 6390 nor the suite's 6391: `serve stop` also matches a head's client server by port.
UNUSED_RAY_PORT = 6399


def test_serve_stop_without_a_head(tmp_path):
    result = subprocess.run([LLMOPS, "serve", "stop", "--port", str(UNUSED_RAY_PORT)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "LLMOPS_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no local Ray head was running"


def test_the_local_ray_head_keeps_its_folder_and_token_private(ray_serve, tmp_path, monkeypatch):
    """The folder around the head's temp folder is 0700 and this user's; its token file 0600; a
    folder that is a link (or another user's) is refused, one open to others is closed."""
    import stat

    from llmops_dagster.serving import ray_cluster

    monkeypatch.setenv("LLMOPS_DATABASE_URL", "postgresql://app:S3cretPW@db.example/llmops")
    ray_serve.address()  # the session's head, started when it is not running (with that URL set)
    folder = ray_serve.local_temp_dir().parent  # Ray's own folder inside is 0777, by Ray
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()
    token = Path.home() / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert stat.S_IMODE(ray_cluster.private_folder(shared).stat().st_mode) == 0o700
    # The head's processes did not inherit our database URL (or anything not on the list).
    from llmops_dagster.serving.ray_cluster import local_head_processes

    environments = []
    for process in local_head_processes(ray_serve.local_temp_dir(), ray_serve.local_port):
        with contextlib.suppress(psutil.Error):
            environments.append(process.environ())
    assert environments and not [e for e in environments if "LLMOPS_DATABASE_URL" in e]
    link = tmp_path / "link"
    link.symlink_to(shared)
    with pytest.raises(ray_cluster.UnsafeFolderError, match="refusing"):
        ray_cluster.private_folder(link)
