"""The Ray cluster Serve runs on: an existing one (RAY_ADDRESS), or a local head on 127.0.0.1.

The local head is started once with `ray start` (so it outlives the process that deploys) with
token authentication on, its token in ~/.ray/auth_token, and stopped by `llmops serve stop`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

LOCAL_PORT = 6390  # GCS port of the local head
AUTH_ENV = {"RAY_AUTH_MODE": "token"}


# What the Ray processes may inherit from ours: the head and every worker it starts keep their
# environment for life, so nothing else (database URLs, cloud keys, tokens) is passed on.
INHERITED_ENV = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "TZ", "HF_HUB_OFFLINE",
                 "HF_HOME", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "LLMOPS_HOME")


def clean_environment() -> dict[str, str]:
    """The environment `ray` commands run with: INHERITED_ENV, Ray's own RAY_* settings, token auth."""
    kept = {k: v for k, v in os.environ.items() if k in INHERITED_ENV or k.startswith("RAY_")}
    return {**kept, **AUTH_ENV}


def _ray(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "ray"), *args]
    return subprocess.run(command, env={**clean_environment(), **(env or {})}, check=check,
                          capture_output=True, text=True)


def ensure_local_head(temp_dir: Path, num_cpus: int, port: int = LOCAL_PORT) -> str:
    """Start the local head when none answers on `port`; return its address."""
    address = f"127.0.0.1:{port}"
    os.environ.update(AUTH_ENV)
    token = Path.home() / ".ray" / "auth_token"
    if not token.exists():
        _ray("get-auth-token", "--generate")
    token.chmod(0o600)  # Ray writes it 0644: the token opens every port of the cluster
    status = _ray("status", f"--address={address}", check=False)
    if status.returncode != 0:
        # Ray makes its temp folder and those inside it 0777: a private parent keeps others out.
        private_folder(temp_dir.parent)
        temp_dir.mkdir(exist_ok=True)
        result = _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                      f"--ray-client-server-port={client_server_port(port)}",
                      f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
                      f"--temp-dir={temp_dir}", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"could not start the local Ray head: {result.stderr[-2000:]}")
    return address


class UnsafeFolderError(RuntimeError):
    """A folder the platform would keep sockets or logs in is not private; the message names it."""


def private_folder(folder: Path) -> Path:
    """`folder`, created 0700 when missing; refused when someone else owns it or others may enter
    it (Ray makes its session, log and socket folders 0777 inside: only a private parent keeps
    other local users out of them)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if folder.is_symlink() or info.st_uid != os.getuid():
        raise UnsafeFolderError(f"{folder} is owned by uid {info.st_uid}, not this user ({os.getuid()}), "
                                "or is a link: refusing to start Ray there")
    if info.st_mode & 0o077:
        folder.chmod(0o700)
    return folder


def connect(address: str) -> None:
    import ray

    if not ray.is_initialized():
        os.environ.update(AUTH_ENV)
        ray.init(address=address, namespace="llmops", logging_level="ERROR",
                 log_to_driver=False)


def client_server_port(gcs_port: int) -> int:
    """Ray's client server port, one per head (Ray's default 10001 would collide)."""
    return 9101 + (gcs_port - LOCAL_PORT)  # below Ray's worker ports (10002-19999)


def local_head_processes(temp_dir: Path, gcs_port: int = LOCAL_PORT) -> list:
    """The psutil processes of the local head started in `temp_dir` (its processes name that folder,
    its client server its port); other Ray clusters on the machine are not among them."""
    import psutil

    client = f"--port={client_server_port(gcs_port)}"
    mine = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(process.info["cmdline"] or [])
            if str(temp_dir) in cmdline or ("ray.util.client.server" in cmdline and client in cmdline):
                mine.append(process)
    return mine


def stop_local_head(temp_dir: Path, gcs_port: int = LOCAL_PORT) -> int:
    """Stop the local head started in `temp_dir`, leaving other Ray clusters on the machine alone.
    Returns how many processes were stopped."""
    import psutil

    mine = local_head_processes(temp_dir, gcs_port)
    for process in mine:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(mine, timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    return len(mine)
