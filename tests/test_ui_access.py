"""Who may use the Dagster UI: `llmops ui --operate` answers only under a secret path kept in a 0600
file of the platform's OS user (404 elsewhere, `/` included); a non-loopback --host without an
authenticating proxy and a bad --port are refused before anything starts. The read-only default is
checked in test_services.py, which starts `llmops ui` anyway.

Touches: a real `llmops ui --operate` (webserver, daemon, code servers) on a free port with its
instance in a database of its own; subprocesses run as OS user nobody (uid 65534: this machine's
tests run as root) to read what another local user could.
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

from llmops_dagster.infra import ui
from llmops_dagster.training.launch import free_port
from tests.test_services import (
    LAUNCH_PARAMS,
    LAUNCH_RUN,
    LLMOPS,
    STOP_TIMEOUT_S,
    _log_tail,
    http,
    start_ui,
    stop_ui,
    ui_environment,
)

NOBODY = 65534
PERMISSIONS = "{ permissions { permission value } }"


def as_nobody(argv: list[str]) -> subprocess.CompletedProcess:
    def drop() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    return subprocess.run(argv, preexec_fn=drop, capture_output=True, text=True, timeout=60)


@pytest.fixture
def open_home():
    """An LLMOPS_HOME every local user may traverse (pytest's tmp_path is not), so that only the
    secret's own modes stand between it and user nobody."""
    home = Path(tempfile.mkdtemp(prefix="llmops-ui-"))
    home.chmod(0o755)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_the_operating_secret_is_a_0600_file_another_user_cannot_read(open_home):
    if os.getuid() != 0:
        pytest.skip("needs root to run a command as user nobody")
    secret, path = ui.operate_secret(open_home)
    assert len(secret) >= 43 and ui.operate_secret(open_home) == (secret, path)  # kept across starts
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == os.getuid()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.parent.chmod(0o755)  # even in a folder open to all, the file itself keeps nobody out
    readable = path.with_name("readable")
    readable.write_text("x")
    readable.chmod(0o644)
    assert as_nobody(["cat", str(readable)]).stdout == "x"  # nobody does read what is open to it
    refused = as_nobody(["cat", str(path)])
    assert refused.returncode != 0 and secret not in refused.stdout
    # A secret file others could read is not trusted: a new secret replaces it.
    path.chmod(0o644)
    replaced, _ = ui.operate_secret(open_home)
    assert replaced != secret and stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(("argv", "message"), [
    (["--port", "-5"], "llmops ui: argument --port: must be at least 1, got -5"),
    (["--port", "70000"], "llmops ui: argument --port: must be at most 65535, got '70000'"),
    (["--host", "0.0.0.0"], "llmops ui: --host '0.0.0.0' is not a loopback address"),
    (["--host", "10.1.2.3", "--operate", "--behind-auth-proxy", "sso"],
     "llmops ui: --operate serves on loopback only"),
])
def test_bad_host_or_port_is_refused_before_anything_starts(argv, message, tmp_path):
    env = {**os.environ, "LLMOPS_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dagster")}
    env.pop(ui.AUTH_PROXY_ENV, None)
    result = subprocess.run([LLMOPS, "ui", *argv], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    # Nothing started: no database server, no Dagster instance, no webserver or daemon.
    assert not (tmp_path / "home").exists() and not (tmp_path / "dagster").exists()


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path):
    import socket

    env = {**os.environ, "LLMOPS_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dagster")}
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([LLMOPS, "ui", "--port", str(port)], env=env, capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"llmops ui: cannot listen on 127.0.0.1:{port}:"), result.stderr
    assert not (tmp_path / "home").exists()


def test_a_declared_auth_proxy_allows_a_non_loopback_host():
    ui.check_binding("0.0.0.0", operate=False, auth_proxy="oauth2-proxy on :443")
    ui.check_binding("::1", operate=True, auth_proxy="")
    with pytest.raises(ui.UiRefused, match="not a loopback address"):
        ui.check_binding("192.168.1.5", operate=False, auth_proxy="  ")


def test_the_operating_ui_answers_only_under_its_secret_path(fresh_database, platform_db, tmp_path,
                                                              open_home):
    env = {**ui_environment(platform_db, tmp_path), "LLMOPS_HOME": str(open_home)}
    port = free_port()
    log = tmp_path / "ui.log"
    ui_process = start_ui(["--port", str(port), "--operate"], env, log)
    descendants: list[psutil.Process] = []
    try:
        descendants = psutil.Process(ui_process.pid).children(recursive=True)
        secret = (open_home / "ui" / "operate_secret").read_text().strip()
        url_file = open_home / "ui" / "operate_url"
        assert url_file.read_text().strip() == f"http://127.0.0.1:{port}/{secret}/"
        assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
        assert str(url_file) in log.read_text() and secret not in log.read_text()
        # Not on any command line (which every local user may read), nor in what nobody can read.
        assert not [p.pid for p in descendants if secret in " ".join(p.cmdline())]
        webserver = next(p for p in descendants
                         if "llmops_dagster.infra.ui webserver" in " ".join(p.cmdline()))
        assert "--read-only" not in webserver.cmdline()
        assert as_nobody(["cat", f"/proc/{webserver.pid}/environ"]).returncode != 0
        assert as_nobody(["cat", str(url_file)]).returncode != 0
        # The code servers' Unix sockets: another user cannot connect (that needs write permission).
        sockets = {c.laddr for p in descendants for c in p.net_connections(kind="unix") if c.laddr}
        print(f"Unix sockets: {sockets}")
        assert sockets and not [s for s in sockets if not s.startswith("/")], sockets  # none abstract
        assert not [s for s in sockets if Path(s).exists() and Path(s).stat().st_mode & 0o022], sockets

        # Without the secret: 404 everywhere, `/` too (no redirect that would show the path).
        root = f"http://127.0.0.1:{port}"
        for path, body in (("/graphql", {"query": LAUNCH_RUN, "variables": {"params": LAUNCH_PARAMS}}),
                           ("/graphql", {"query": PERMISSIONS}), ("/", None), ("/server_info", None),
                           (f"/{secret[:-1]}/graphql", {"query": PERMISSIONS})):
            status, answer, headers = http(root + path, body)
            assert status == 404 and secret.encode() not in answer, (path, status, answer)
            assert "location" not in {name.lower() for name in headers}, (path, headers)
        # With it: the operating permissions (launching a run is allowed; none is launched here).
        status, answer, _ = http(f"{root}/{secret}/graphql", {"query": PERMISSIONS})
        assert status == 200, answer
        permissions = {p["permission"]: p["value"] for p in json.loads(answer)["data"]["permissions"]}
        assert permissions["launch_pipeline_execution"] is True, permissions

        ui_process.send_signal(signal.SIGTERM)
        ui_process.wait(timeout=STOP_TIMEOUT_S)
        assert ui_process.returncode == 0, _log_tail(log)
    finally:  # kills only when an assertion above failed
        stop_ui(ui_process, descendants)
