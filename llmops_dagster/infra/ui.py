"""`llmops ui`: the Dagster webserver and daemon, read-only unless its owner asks to operate.

Browsing and operating are separate. By default the webserver is read-only: anyone who reaches it
sees assets, runs and lineage, and every GraphQL mutation (launching runs, switching schedules and
sensors) answers UnauthorizedError. `llmops ui --operate` serves the operating UI under a secret
path prefix instead: the prefix lives in a 0600 file under $LLMOPS_HOME/ui/, reaches the webserver
through its environment (/proc/PID/environ is readable by its owner only; argv in /proc/PID/cmdline
is readable by every local user), and every path outside it answers 404, also `/` (Dagster's own
app would redirect `/` to the prefix and so show it). A TCP port on 127.0.0.1 is open to every
local user, so the secret path, not the address, is what keeps them out; a Unix socket would keep
them out too, but a browser cannot open one.

Both modes run two children of this process, in one process group of their own: the webserver
(`python -m llmops_dagster.infra.ui webserver`, which wraps Dagster's app in the gate above) and
`dagster-daemon run`, each with its own code server on a Unix socket. SIGTERM, SIGINT or SIGHUP to
`llmops ui` becomes SIGINT to that group (their graceful shutdown), then SIGKILL to the group if
anything in it is left after STOP_TIMEOUT_S. The group is not the terminal's foreground group, so a
shell's background job (`make ui &`, SIGINT ignored) stops the same way.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from llmops_dagster.infra.settings import PACKAGE_DIR, llmops_home

REPO_ROOT = PACKAGE_DIR.parent
WORKSPACE = REPO_ROOT / "workspace.yaml"
STOP_TIMEOUT_S = 20.0  # s; a graceful stop takes about 5 s
POLL_S = 0.5
# The operating UI's path prefix, handed to the webserver child in its environment (never argv).
PREFIX_ENV = "LLMOPS_UI_PATH_PREFIX"
# Names the authenticating proxy in front of a webserver bound to a non-loopback address.
AUTH_PROXY_ENV = "LLMOPS_UI_AUTH_PROXY"
# The read-only UI's address, in $LLMOPS_HOME/ui/ while `llmops ui` serves it: pages that link into
# the UI (`llmops trace --html`) point there. The operating UI's address is a secret: never linked.
URL_FILE = "url"
DEFAULT_URL = "http://127.0.0.1:3000"
# Routes that write events into the instance without GraphQL's permission check: closed when read-only.
WRITE_ROUTES = ("/report_asset_materialization/", "/report_asset_check/", "/report_asset_observation/")


class UiRefused(Exception):
    """A setting that `llmops ui` refuses before it starts anything."""


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, operate: bool, auth_proxy: str) -> None:
    """Refuse an address other local users' or other machines' clients could reach without a login."""
    if operate and not is_loopback(host):
        raise UiRefused(f"--operate serves on loopback only (127.0.0.1), not --host {host!r}")
    if not is_loopback(host) and not auth_proxy.strip():
        raise UiRefused(f"--host {host!r} is not a loopback address; the webserver has no login of its "
                        f"own: name the authenticating proxy in front of it with --behind-auth-proxy "
                        f"or ${AUTH_PROXY_ENV}")


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on (the webserver would start, fail to bind, and
    take the daemon down with it half a minute later)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UiRefused(f"cannot listen on {host}:{port}: {error.strerror}") from None


def ui_folder(home: Path | None = None) -> Path:
    """$LLMOPS_HOME/ui, 0700 and this user's (it holds the operating UI's secret)."""
    folder = (home or llmops_home()) / "ui"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise UiRefused(f"{folder} is not a folder of this user: refusing to keep a secret there")
    folder.chmod(0o700)
    return folder


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a new 0600 file at `path` (replacing any file there, never following a link)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)


def operate_secret(home: Path | None = None) -> tuple[str, Path]:
    """The operating UI's secret path segment and the 0600 file holding it, made on first use and
    kept (a bookmarked URL survives a restart); a file another user could read is replaced."""
    path = ui_folder(home) / "operate_secret"
    with contextlib.suppress(FileNotFoundError):
        info = path.lstat()
        if (stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()
                and stat.S_IMODE(info.st_mode) == 0o600):
            secret = path.read_text(encoding="utf-8").strip()
            if len(secret) >= 43:  # token_urlsafe(32): 43 characters, 256 bits
                return secret, path
    secret = secrets.token_urlsafe(32)
    _write_private(path, secret + "\n")
    return secret, path


def recorded_url(home: Path | None = None) -> str | None:
    """The read-only UI's address that a running `llmops ui` recorded (URL_FILE), or None."""
    try:
        text = ((home or llmops_home()) / "ui" / URL_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def answers(url: str, timeout_s: float = 3.0) -> bool:
    """Whether a Dagster webserver answers at `url` (its /server_info route)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/server_info", timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def webserver_command(host: str, port: int, read_only: bool) -> list[str]:
    """The webserver child; the operating UI's prefix is not on it (it is in the environment)."""
    return [sys.executable, "-m", "llmops_dagster.infra.ui", "webserver", "--host", host, "--port", str(port),
            *(["--read-only"] if read_only else [])]


def daemon_command(workspace: Path = WORKSPACE) -> list[str]:
    return [sys.executable, "-m", "dagster._daemon", "run", "-w", str(workspace)]


def _child_setup() -> None:
    """In the child before exec: the default SIGINT and SIGTERM, whatever the parent inherited, and
    no file or socket writable by group or others (a code server's Unix socket takes the umask: one
    others could write to, they could connect to, and shut the code server down)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.umask(os.umask(0) | 0o022)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    import psutil

    members = []
    for process in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) == pgid:
                members.append(process.pid)
    return members


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _address(host: str) -> str:
    """`host` as a URL names it: an IPv6 address bracketed."""
    return f"[{host}]" if ":" in host else host


def _stop_signals() -> list[int]:
    """SIGTERM and SIGINT always; SIGHUP unless ignored (nohup: the UI outlives the terminal)."""
    signals = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signals.append(signal.SIGHUP)
    return signals


def run_ui(env: dict[str, str], host: str = "127.0.0.1", port: int = 3000, operate: bool = False,
           stop_timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Run the webserver and the daemon until one exits or this process gets a stop signal; return
    0 after a requested stop, else the exit status of the child that ended first."""
    # Pin LLMOPS_HOME: the code servers run in the repository root, not in this working directory.
    env = {**env, "LLMOPS_HOME": str(llmops_home())}
    env.pop(PREFIX_ENV, None)
    webserver_env = dict(env)
    if operate:
        secret, secret_file = operate_secret()
        webserver_env[PREFIX_ENV] = "/" + secret
        operate_url = secret_file.with_name("operate_url")
        _write_private(operate_url, f"http://{_address(host)}:{port}/{secret}/\n")
        print(f"llmops ui: operating UI on {host}:{port}; its address (a secret, for this OS user only) "
              f"is in {operate_url}", file=sys.stderr, flush=True)
        url_file = None
    else:
        url_file = ui_folder() / URL_FILE
        _write_private(url_file, f"http://{_address(host)}:{port}\n")
        print(f"llmops ui: read-only UI at http://{host}:{port} (browse; `llmops ui --operate` to "
              "launch runs)", file=sys.stderr, flush=True)
    requested: list[int] = []
    # The handler only records: the loop below forwards, so that SIGINT reaches the group once.
    previous = {signum: signal.signal(signum, lambda signum, _: requested.append(signum))
                for signum in _stop_signals()}
    children: list[subprocess.Popen] = []
    try:
        common = {"cwd": REPO_ROOT, "stdin": subprocess.DEVNULL, "preexec_fn": _child_setup}
        children.append(subprocess.Popen(webserver_command(host, port, read_only=not operate),
                                         env=webserver_env, process_group=0, **common))
        children.append(subprocess.Popen(daemon_command(), env=env, process_group=children[0].pid,
                                         **common))
        killed, first = _wait_and_stop(children, requested, stop_timeout_s)
    finally:
        if url_file is not None:  # links must not lead to a UI that stopped
            with contextlib.suppress(FileNotFoundError):
                url_file.unlink()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for child in children:  # only when starting the second child failed
            if child.poll() is None:
                _signal_group(children[0].pid, signal.SIGKILL)
                child.wait()
    if requested and not killed:
        return 0
    code = first.returncode if first is not None else 1
    if first is not None:
        name = "webserver" if first is children[0] else "daemon"
        print(f"llmops ui: the {name} exited with status {code}; the rest was stopped (its output is "
              "above)", file=sys.stderr)
    return 128 - code if code < 0 else code or 1  # killed by signal N: 128 + N, as a shell reports it


def _wait_and_stop(children: list[subprocess.Popen], requested: list[int],
                   stop_timeout_s: float) -> tuple[bool, subprocess.Popen | None]:
    """Wait until every child and every process of their group are gone: SIGINT to the group on the
    first stop signal (or when a child exits), SIGKILL on a second one or after the timeout.
    Returns whether SIGKILL was needed, and the child that exited on its own first (if any)."""
    pgid = children[0].pid  # process_group=0: the first child leads the group
    interrupted_at = None
    first = None
    while True:
        exited = [child for child in children if child.poll() is not None]
        if exited and first is None and not requested:
            first = exited[0]
        if len(exited) == len(children) and not group_members(pgid):
            return False, first
        if interrupted_at is None and (requested or exited):
            _signal_group(pgid, signal.SIGINT)
            interrupted_at = time.monotonic()
        elif interrupted_at is not None and (
                len(requested) > 1 or time.monotonic() - interrupted_at > stop_timeout_s):
            _signal_group(pgid, signal.SIGKILL)
            for child in children:
                child.wait()
            return True, first
        time.sleep(POLL_S)


class Gate:
    """ASGI wrapper of Dagster's app: outside `prefix`, 404 (also for `/`, which Dagster would
    redirect to the prefix); when `read_only`, 403 on WRITE_ROUTES."""

    def __init__(self, app, prefix: str, read_only: bool):
        self.app, self.prefix, self.read_only = app, prefix, read_only

    def _refusal(self, path: str) -> int | None:
        if self.prefix:
            head, rest = path[:len(self.prefix)], path[len(self.prefix):]
            # Constant time: the prefix is a secret, the rest of the path is not.
            if not hmac.compare_digest(head.encode(), self.prefix.encode()) or rest[:1] not in ("", "/"):
                return 404
            path = rest
        if self.read_only and path.startswith(WRITE_ROUTES):
            return 403
        return None

    async def __call__(self, scope, receive, send):
        status = self._refusal(scope["path"]) if scope["type"] in ("http", "websocket") else None
        if status is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            body = b"Not Found" if status == 404 else b"Forbidden: this UI is read-only"
            headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})


def serve_webserver(host: str, port: int, read_only: bool) -> None:
    """The webserver child: Dagster's app for this workspace behind the Gate (runs until SIGINT)."""
    import dagster as dg
    import uvicorn
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster_webserver.app import create_app_from_workspace_process_context
    from dagster_webserver.version import __version__

    # Out of the environment before the code server starts: no process of a run inherits it.
    prefix = os.environ.pop(PREFIX_ENV, "")
    with dg.DagsterInstance.get() as instance, WorkspaceProcessContext(
            instance, WorkspaceFileTarget(paths=[str(WORKSPACE)]), version=__version__,
            read_only=read_only) as context:
        app = create_app_from_workspace_process_context(context, prefix)
        uvicorn.run(Gate(app, prefix, read_only), host=host, port=port, log_level="warning")


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llmops_dagster.infra.ui")
    commands = parser.add_subparsers(dest="command", required=True)
    webserver = commands.add_parser("webserver", help="the webserver child of `llmops ui`")
    webserver.add_argument("--host", required=True)
    webserver.add_argument("--port", type=int, required=True)
    webserver.add_argument("--read-only", action="store_true")
    args = parser.parse_args(argv)
    try:
        serve_webserver(args.host, args.port, args.read_only)
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it stopped on
        pass
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
