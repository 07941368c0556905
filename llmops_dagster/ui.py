"""`llmops ui`: `dagster dev` (webserver and daemon) that stops on SIGTERM and SIGINT, also in the background.

A shell starts a background job (`make ui &`, nohup) with SIGINT ignored, and `dagster dev` maps
SIGTERM to its SIGINT handler, so started that way it would stop on neither. Here `dagster dev` runs in
a session of its own with SIGINT restored; SIGTERM, SIGINT or SIGHUP to `llmops ui` becomes SIGINT to
that process group (dagster dev's graceful shutdown of its webserver, daemon and code server), then
SIGKILL to the group if anything in it is left after STOP_TIMEOUT_S.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmops_dagster.settings import PACKAGE_DIR, llmops_home

REPO_ROOT = PACKAGE_DIR.parent
WORKSPACE = REPO_ROOT / "workspace.yaml"
STOP_TIMEOUT_S = 20.0  # s; a graceful stop takes about 5 s (dagster dev alone waits up to 60 s a child)
POLL_S = 0.5


def dagster_dev_command(host: str, port: int, workspace: Path = WORKSPACE) -> list[str]:
    """The `dagster dev` command line of this environment."""
    dagster = Path(sys.executable).parent / "dagster"
    return [str(dagster), "dev", "-w", str(workspace), "-h", host, "-p", str(port)]


def _restore_default_signals() -> None:
    """In the child before exec: the default SIGINT and SIGTERM, whatever the parent inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


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


def _stop_signals() -> list[int]:
    """SIGTERM and SIGINT always; SIGHUP unless ignored (nohup: the UI outlives the terminal)."""
    signals = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signals.append(signal.SIGHUP)
    return signals


def run_dagster_dev(env: dict[str, str], host: str = "127.0.0.1", port: int = 3000,
                    stop_timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Run `dagster dev` until it exits or this process gets a stop signal; return its exit status."""
    requested: list[int] = []
    # The handler only records: the loop below forwards, so that SIGINT reaches dagster dev once
    # (a second one would cut its own shutdown short).
    previous = {signum: signal.signal(signum, lambda signum, _: requested.append(signum))
                for signum in _stop_signals()}
    try:
        # Pin LLMOPS_HOME: the code server runs in the repository root, not in this working directory.
        child = subprocess.Popen(dagster_dev_command(host, port), cwd=REPO_ROOT,
                                 env={**env, "LLMOPS_HOME": str(llmops_home())},
                                 start_new_session=True, preexec_fn=_restore_default_signals)
        _wait_and_stop(child, requested, stop_timeout_s)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    code = child.returncode
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


def _wait_and_stop(child: subprocess.Popen, requested: list[int], stop_timeout_s: float) -> None:
    """Wait until `child` and every process of its group are gone: SIGINT to the group on the first
    stop signal (or when the child exits leaving others), SIGKILL on a second one or after the timeout."""
    pgid = child.pid  # start_new_session: the child leads its own group
    interrupted_at = None
    while True:
        exited = child.poll() is not None
        if exited and not group_members(pgid):
            return
        if interrupted_at is None and (requested or exited):
            _signal_group(pgid, signal.SIGINT)
            interrupted_at = time.monotonic()
        elif interrupted_at is not None and (
                len(requested) > 1 or time.monotonic() - interrupted_at > stop_timeout_s):
            _signal_group(pgid, signal.SIGKILL)
            child.wait()
            return
        time.sleep(POLL_S)
