"""On one machine, every TCP port the platform listens on is on loopback, measured `ss`-style with
psutil on the real processes: the local Ray head serving the model (GCS, raylet, agents, Serve's
controller, proxy and replicas, and this test process as Ray driver), a 2-rank torchrun fine-tune
(its rendezvous store and the ranks' gloo sockets) and the embedded PostgreSQL (no TCP at all).
`llmops ui` (webserver, daemon, code servers) is measured in test_services.py, which starts it anyway.

The one listener Ray gives no setting for is in NOT_LOOPBACK, as in the README's "What listens
where"; it must refuse a call without the cluster's token.

Touches: the session's Ray head and served model, the session's PostgreSQL, and a 2-step torchrun of
the served model's run file into a folder of this test's own.
"""

import ipaddress
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import sqlalchemy as sa

from llmops_dagster.serving import ray_cluster
from llmops_dagster.training.launch import launch_command
from tests.conftest import SERVING_GCS_PORT, SERVING_HTTP_PORT

# Listeners allowed on other addresses than loopback: process label prefix -> the README's reason.
NOT_LOOPBACK = {
    "ray::ServeReplica": "Serve's inter-deployment gRPC server, random port: Ray 2.60 binds it to "
                         "\"[::]:0\" (ray/serve/_private/replica.py), no setting; Ray token required",
}
SAMPLE_S = 0.05  # s between two looks at a short-lived process tree
TORCHRUN_TIMEOUT_S = 300


@dataclass(frozen=True)
class Listener:
    ip: str
    port: int
    pid: int
    label: str

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"LISTEN  {host + ':' + str(self.port):<28} pid={self.pid:<7} {self.label}"


def label(process: psutil.Process) -> str:
    """What a process is: Ray's `ray::Name`, a Python module or script, or an executable's name."""
    cmdline = process.cmdline() or [process.name()]
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    if "-m" in cmdline[:-1]:
        return cmdline[cmdline.index("-m") + 1]
    if Path(cmdline[0]).name.startswith("python") and len(cmdline) > 1:
        return Path(next((a for a in cmdline[1:] if not a.startswith("-")), cmdline[1])).name
    return Path(cmdline[0]).name


def listeners(processes: list[psutil.Process]) -> set[Listener]:
    """The listening TCP sockets (IPv4 and IPv6) of `processes` that are still alive."""
    found = set()
    for process in processes:
        try:
            name = label(process)
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    found.add(Listener(connection.laddr.ip, connection.laddr.port, process.pid, name))
        except psutil.NoSuchProcess:
            continue
    return found


def with_descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if address.version == 6 and address.ipv4_mapped is not None:  # ::ffff:127.0.0.1
        address = address.ipv4_mapped
    return address.is_loopback


def not_loopback(found: set[Listener]) -> tuple[list[Listener], list[Listener]]:
    """(documented exceptions, the rest) among the listeners not on loopback."""
    outside = sorted((x for x in found if not is_loopback(x.ip)), key=str)
    allowed = [x for x in outside if any(x.label.startswith(p) for p in NOT_LOOPBACK)]
    return allowed, [x for x in outside if x not in allowed]


def listing(found: set[Listener]) -> str:
    return "\n".join(str(x) for x in sorted(found, key=lambda x: (x.label, x.port)))


def machine_address() -> str:
    """An IPv4 address of this machine other than loopback (what another machine would dial), or
    127.0.0.1 when it has none."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family.name == "AF_INET" and not is_loopback(address.address):
                return address.address
    return "127.0.0.1"


def refuses_without_token(port: int) -> str:
    """The gRPC status of a call to Serve's inter-deployment service at this machine's address
    without Ray's token (expected: UNAUTHENTICATED)."""
    import grpc

    with grpc.insecure_channel(f"{machine_address()}:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest",
                                   request_serializer=lambda body: body,
                                   response_deserializer=lambda body: body)
        try:
            call(b"", timeout=10)
        except grpc.RpcError as error:
            return error.code().name
    return "OK"


def assert_loopback_only(found: set[Listener]) -> None:
    """Every listener on loopback, but for NOT_LOOPBACK's, which must want the token."""
    allowed, forbidden = not_loopback(found)
    assert not forbidden, f"listening beyond loopback:\n{listing(set(forbidden))}\n\nall:\n{listing(found)}"
    for listener in allowed:
        assert refuses_without_token(listener.port) == "UNAUTHENTICATED", str(listener)


def test_the_ray_head_serving_the_model_listens_on_loopback(served_model, ray_serve):
    head = ray_cluster.local_head_processes(ray_serve.local_temp_dir(), ray_serve.local_port)
    found = listeners(head) | listeners([psutil.Process()])  # this process: the Ray driver
    print(f"\n{listing(found)}")
    assert_loopback_only(found)
    where = {(x.label, x.port): x.ip for x in found}
    assert is_loopback(where[("gcs_server", SERVING_GCS_PORT)])
    assert is_loopback(where[("ray::ProxyActor", SERVING_HTTP_PORT)])
    labels = {x.label for x in found}
    assert {"raylet", "ray::DashboardAgent", "ray::ServeController", "monitor.py", "dashboard.py"} <= labels
    assert any(name.startswith("ray::ServeReplica") for name in labels), labels
    assert os.getpid() in {x.pid for x in found}  # the driver's own gRPC server was seen


def test_a_torchrun_finetune_listens_on_loopback(served_template, llmops_home, tmp_path):
    """2 ranks of the served model's fine-tune for 2 steps, the launcher's tree sampled every
    SAMPLE_S while it runs: its rendezvous store and each rank's gloo sockets, all on loopback."""
    [run_file] = (llmops_home / "served-artifacts").rglob("train_config.json")
    run = json.loads(run_file.read_text())
    output = tmp_path / "run"
    output.mkdir()
    (output / "train_config.json").write_text(json.dumps(
        {**run, "output_dir": str(output), "max_steps": 2, "checkpoint_every": 2, "eval_file": None}))
    log = tmp_path / "torchrun.log"
    found: set[Listener] = set()
    with open(log, "wb") as out:
        launcher = subprocess.Popen(launch_command(output / "train_config.json", 2),
                                    env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=output,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    root = psutil.Process(launcher.pid)
    deadline = time.monotonic() + TORCHRUN_TIMEOUT_S
    try:
        while launcher.poll() is None and time.monotonic() < deadline:
            found |= listeners(with_descendants(root))
            time.sleep(SAMPLE_S)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    print(f"\n{listing(found)}")
    assert launcher.returncode == 0, log.read_text(errors="replace")[-3000:]
    assert_loopback_only(found)
    assert [x for x in found if x.label == "llmops_dagster.training.torchrun_local"], listing(found)
    ranks = {x.pid for x in found if x.label == "llmops_dagster.training.train_lora"}
    assert len(ranks) == 2, listing(found)  # each rank's gloo listener was seen


def test_the_embedded_postgresql_listens_on_no_tcp_port(platform_db):
    with platform_db.engine().connect() as connection:
        assert connection.execute(sa.text("SHOW listen_addresses")).scalar() == ""  # Unix socket only
