"""The Ray cluster Serve runs on: an existing one (RAY_ADDRESS), or a local head on 127.0.0.1.

The local head is started once with `ray start` (so it outlives the process that deploys) with
token authentication on, its token in ~/.ray/auth_token, and stopped by `llmops serve stop`.
It listens on 127.0.0.1 only, except for one port Ray has no setting for (LOCAL_HEAD_ENV). Its
Serve proxy admits requests through admission.py (NODE_ENV; a node of another cluster needs the
same environment at its `ray start`).
Worker nodes on the same machine join it with `ray start --address` (join_local_head).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from llmops_dagster.serving.admission import PROXY_ENV

LOCAL_PORT = 6390  # GCS port of the local head
AUTH_ENV = {"RAY_AUTH_MODE": "token"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# `ray start --node-ip-address=127.0.0.1` is replaced by the machine's routable address, and every
# Ray server then listens on all interfaces. With "clusters" off (Ray's switch for Windows and macOS,
# read in ray/_private/services.py and scripts.py), the node address stays 127.0.0.1: GCS, raylet,
# object manager, workers' gRPC servers, client server, dashboard agent, runtime-env agent and the
# autoscaler's and dashboard's metrics servers listen on 127.0.0.1, and no other machine can join.
# Metrics collection off: nothing scrapes the agent's Prometheus port, which answers without a token.
# The autoscaler's and dashboard's metrics servers (no token either) take any free port: Ray's fixed
# 44217 and 44227 would be taken by a second head on the machine.
# Not movable (Ray 2.60): each Serve replica's inter-deployment gRPC server binds "[::]:0" (hard-coded
# in ray/serve/_private/replica.py); it refuses calls without the cluster's token.
LOCAL_HEAD_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_enable_metrics_collection": "0",
                  "AUTOSCALER_METRIC_PORT": "0", "DASHBOARD_METRIC_PORT": "0"}
# Every node's Serve proxy admits requests through admission.py (body limits, in-flight caps,
# X-Forwarded-For only from trusted proxies): read when the proxy starts, so set at `ray start`.
NODE_ENV = {**LOCAL_HEAD_ENV, **PROXY_ENV}


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


def _accepts(port: int, timeout_s: float = 1) -> bool:
    """Whether anything accepts TCP connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def ensure_local_head(temp_dir: Path, num_cpus: int, port: int = LOCAL_PORT,
                      resources: dict[str, float] | None = None,
                      worker_ports: tuple[int, int] | None = None) -> str:
    """Start the local head when none answers on `port`; return its address.

    `resources`: custom resources the head offers besides its CPUs; `worker_ports`: the range its
    workers' gRPC servers take (Ray's default 10002-19999 when None)."""
    address = f"127.0.0.1:{port}"
    os.environ.update(AUTH_ENV)
    token = Path.home() / ".ray" / "auth_token"
    if not token.exists():
        _ray("get-auth-token", "--generate")
    token.chmod(0o600)  # Ray writes it 0644: the token opens every port of the cluster
    # `ray status` takes about 40 s to give up when nothing listens: ask it only when something
    # does, and not when this process is connected to that head already (a subprocess: 1.9 s).
    running = _accepts(port) and (_connected_to(address) or _ray(
        "status", f"--address={address}", env=LOCAL_HEAD_ENV, check=False).returncode == 0)
    if not running:
        # Ray makes its temp folder and those inside it 0777: a private parent keeps others out.
        private_folder(temp_dir.parent)
        temp_dir.mkdir(exist_ok=True)
        # Agent HTTP port 0 (any free one): Ray's fixed 52365 would be taken by a second head.
        result = _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                      f"--ray-client-server-port={client_server_port(port)}",
                      "--dashboard-agent-listen-port=0",
                      f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
                      f"--temp-dir={temp_dir}", *_node_options(resources, worker_ports),
                      env=NODE_ENV, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"could not start the local Ray head: {result.stderr[-2000:]}")
    return address


def _connected_to(address: str) -> bool:
    """Whether this process is connected to the Ray cluster whose GCS is at `address`."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().gcs_address == address


def _node_options(resources: dict[str, float] | None, worker_ports: tuple[int, int] | None) -> list[str]:
    options = [f"--resources={json.dumps(resources)}"] if resources else []
    if worker_ports is not None:
        options += [f"--min-worker-port={worker_ports[0]}", f"--max-worker-port={worker_ports[1]}"]
    return options


# `ray start --address` refuses to start a worker node while clusters are off (LOCAL_HEAD_ENV): a
# check in its command line only (ray/scripts/scripts.py). This runs the same command with that one
# check passed, while Ray's own address resolution keeps the switch off, so that the node's address
# stays 127.0.0.1 (with clusters on, 127.0.0.1 in --address or --node-ip-address is replaced by the
# routable address, where a local head does not listen).
_RAY_START_ON_LOOPBACK = """
import sys, types
from ray._private import ray_constants
from ray.scripts import scripts
scripts.ray_constants = types.SimpleNamespace(**{**vars(ray_constants), "ENABLE_RAY_CLUSTER": True})
sys.exit(scripts.main())
"""


def join_local_head(address: str, num_cpus: int, first_port: int,
                    resources: dict[str, float] | None = None, timeout_s: float = 120) -> int:
    """Start a worker node on this machine that joins the local head at `address` (`ray start
    --address`, token authentication as on the head); return its process group: the raylet, its
    agents and log monitor (the workers the raylet starts each put themselves in a group of their own).

    Every port the node listens on is fixed from `first_port`, since a second node on one machine
    cannot take the head's (between machines, they are what a firewall between nodes opens): node
    manager +0, object manager +1, dashboard agent gRPC +2 and HTTP +3, runtime-env agent +4, metrics
    export +5 (not opened: metrics collection is off), the workers' gRPC servers +10 to +49. The node
    listens on 127.0.0.1 as the head does and keeps its sockets and logs in the head's session folder
    (Ray takes it from the GCS), private to this user.
    """
    if not on_loopback(address):
        raise ValueError(f"join_local_head joins a head on this machine (127.0.0.1), not {address}: on "
                         "another machine, run `ray start --address` there with the cluster's token")
    command = [sys.executable, "-c", _RAY_START_ON_LOOPBACK, "start", f"--address={address}",
               "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--disable-usage-stats",
               f"--node-manager-port={first_port}", f"--object-manager-port={first_port + 1}",
               f"--dashboard-agent-grpc-port={first_port + 2}",
               f"--dashboard-agent-listen-port={first_port + 3}",
               f"--runtime-env-agent-port={first_port + 4}", f"--metrics-export-port={first_port + 5}",
               *_node_options(resources, (first_port + 10, first_port + 49))]
    # A session of its own: the node's processes form one group, which outlives this call.
    process = subprocess.Popen(command, env={**clean_environment(), **NODE_ENV},
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stderr = f"`ray start` did not return within {timeout_s:.0f} s"
    if process.returncode != 0:  # None after the timeout
        with contextlib.suppress(ProcessLookupError):  # what it started so far is left in its group
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise RuntimeError(f"could not join a worker node to {address}: {stderr[-2000:]}")
    return process.pid


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


def on_loopback(address: str) -> bool:
    """Whether `address` (host:port) names a cluster on this machine's loopback."""
    return address.rsplit(":", 1)[0].strip("[]") in LOOPBACK_HOSTS


def connect(address: str, local: bool = False) -> None:
    """Connect this process to the cluster at `address` (`local`: the head of ensure_local_head;
    an address on 127.0.0.1, as RAY_ADDRESS, is a cluster of this machine and connects the same way)."""
    import ray

    if not ray.is_initialized():
        os.environ.update(AUTH_ENV)
        if local or on_loopback(address):
            # This process's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (LOCAL_HEAD_ENV), read when ray was
            # imported: without it ray.init turns 127.0.0.1 into the routable address, where the
            # local head does not listen, and this driver's own gRPC server would listen there.
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(address=address, namespace="llmops", logging_level="ERROR",
                 log_to_driver=False)


def client_server_port(gcs_port: int) -> int:
    """Ray's client server port, one per head (Ray's default 10001 would collide)."""
    return 9101 + (gcs_port - LOCAL_PORT)  # below Ray's worker ports (10002-19999)


def local_head_processes(temp_dir: Path, gcs_port: int = LOCAL_PORT) -> list:
    """The psutil processes of the local head started in `temp_dir` (its processes name that folder,
    its client server its port) and their descendants (agents and workers, which rename themselves
    `ray::...`); other Ray clusters on the machine are not among them."""
    import psutil

    client = f"--port={client_server_port(gcs_port)}"
    mine = {}
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(process.info["cmdline"] or [])
            if str(temp_dir) in cmdline or ("ray.util.client.server" in cmdline and client in cmdline):
                mine[process.pid] = process
                mine.update((child.pid, child) for child in process.children(recursive=True))
    return list(mine.values())


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
