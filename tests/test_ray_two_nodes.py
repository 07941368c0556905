"""Serving on a Ray cluster of two nodes on one machine: a head, and a worker node joined with
`ray start --address`, each with its own CPU and a custom resource naming it, token authentication
on. serving_deployment deploys two replicas to the cluster named by RAY_ADDRESS alone, one on each
node, and the worker's replica reaches PostgreSQL as the serving role with the URL and password
files it reads itself. Then the worker node is killed (SIGKILL to its raylet's process group and
to every process the raylet started) while questions arrive at 20 a second: at most 1% of them fail,
the head answers on alone, and when the worker rejoins (`ray start --address` again) two replicas
run again, one on each node.

Touches: a Ray cluster of this test's own on 127.0.0.1 (GCS port LLMOPS_TEST_CLUSTER_RAY_PORT, Serve
on LLMOPS_TEST_CLUSTER_HTTP_PORT, the nodes' other fixed ports from LLMOPS_TEST_CLUSTER_FIRST_PORT),
stopped at the end whatever happens; a copy of the session's served template database; the
session's trained model (read only). The session's own head is left alone (this process only
disconnects from it)."""

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import psutil
import pytest
import sqlalchemy as sa

from assets.serving import serving_deployment
from llmops_dagster.infra import embedded_auth, secrets
from llmops_dagster.infra.database_roles import SERVING
from llmops_dagster.serving import ray_cluster
from resources.database import PostgresResource
from resources.serving import APP_NAME, RayServeResource
from tests.conftest import SERVED_TEMPLATE_DATABASE, UNLIMITED, new_database, unique, use_database
from tests.traffic import Traffic

# Not the session head's ports (conftest: 6391 and 8011 by default), so that this cluster and that
# head may both run in one session. The nodes' fixed ports lie above Ray's default worker range
# (10002-19999), where every other head on the machine starts its workers.
CLUSTER_GCS_PORT = int(os.environ.get("LLMOPS_TEST_CLUSTER_RAY_PORT", "6392"))
CLUSTER_HTTP_PORT = int(os.environ.get("LLMOPS_TEST_CLUSTER_HTTP_PORT", "8012"))
FIRST_PORT = int(os.environ.get("LLMOPS_TEST_CLUSTER_FIRST_PORT", "20100"))
HEAD_WORKER_PORTS = (FIRST_PORT, FIRST_PORT + 29)  # the head's workers; the worker node's from +40
WORKER_FIRST_PORT = FIRST_PORT + 40  # ray_cluster.join_local_head: +0 to +49 from here
RATE_PER_S = 20
# The GCS marks a node dead when its raylet fails its health checks (about 7 s after a kill here, on
# Ray's defaults); Serve then replaces the replica, which waits for a CPU (the head's is taken).
NODE_DEATH_TIMEOUT_S = 60
REPLICA_TIMEOUT_S = 120


@dataclass
class TwoNodes:
    address: str
    temp_dir: Path
    worker_groups: list[int] = field(default_factory=list)  # process groups of the worker nodes started

    def join_worker(self) -> int:
        """A worker node with one CPU and the custom resource `node_worker` (`ray start --address`)."""
        group = ray_cluster.join_local_head(self.address, num_cpus=1, first_port=WORKER_FIRST_PORT,
                                            resources={"node_worker": 1})
        self.worker_groups.append(group)
        return group


def node_processes(group: int) -> list[psutil.Process]:
    """A worker node's processes: its raylet's process group (raylet, agents, log monitor) and every
    process the raylet started (its workers each put themselves in a group of their own)."""
    found = {}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == group:
                found.update((p.pid, p) for p in [process, *process.children(recursive=True)])
    return list(found.values())


def kill_node(group: int) -> list[int]:
    """SIGKILL a worker node as a power cut would: its raylet's process group and every process the
    raylet started (the group alone would leave its workers to notice the raylet's death by
    themselves). Returns the processes killed."""
    doomed = node_processes(group)  # found before: once the raylet is gone, they are init's children
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    for process in doomed:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(doomed, timeout=10)
    return sorted(p.pid for p in doomed)


def on_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def listeners(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process, address, port) of every listening TCP socket of `processes`."""
    found = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            name = (process.cmdline() or [process.name()])[0].split()[0]
            found += [(name, c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
    return sorted(found)


def stop_cluster(cluster: TwoNodes) -> None:
    """Kill every process of the cluster: worker nodes first, then the head and everything started
    under its folder (the worker nodes' processes name the shared session folder too)."""
    import ray

    ray.shutdown()
    for group in cluster.worker_groups:
        kill_node(group)
    head = ray_cluster.local_head_processes(cluster.temp_dir, CLUSTER_GCS_PORT)
    for process in head:  # SIGKILL: the cluster is this test's alone and keeps nothing
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(head, timeout=10)


@pytest.fixture
def two_nodes():
    """A head (one CPU, resource `node_head`) and one worker node (one CPU, `node_worker`) on 127.0.0.1,
    token authentication on; every process of it killed at the end."""
    import ray

    ray.shutdown()  # this process may be the driver of the session's head: it joins this cluster instead
    # bandit B108: Ray's socket paths must stay short; private_folder makes the folder 0700 and ours.
    folder = ray_cluster.private_folder(Path(f"/tmp/llmops-2nodes-{os.getuid()}-{CLUSTER_GCS_PORT}"))  # nosec
    cluster = TwoNodes(address=f"127.0.0.1:{CLUSTER_GCS_PORT}", temp_dir=folder / "ray")
    stop_cluster(cluster)  # a cluster left by an interrupted run of this test
    try:
        ray_cluster.ensure_local_head(cluster.temp_dir, num_cpus=1, port=CLUSTER_GCS_PORT,
                                      resources={"node_head": 1}, worker_ports=HEAD_WORKER_PORTS)
        cluster.join_worker()
        yield cluster
    finally:
        stop_cluster(cluster)
        shutil.rmtree(folder, ignore_errors=True)


def replicas() -> list[dict]:
    """The live ModelServer replicas: their node ('head' or 'worker', by the node's custom resource;
    'gone' for a node marked dead) and process, from the GCS actor table."""
    import ray
    from ray._private import state

    role = {node["NodeID"]: name for node in ray.nodes() if node["Alive"]
            for name in ("head", "worker") if f"node_{name}" in node["Resources"]}
    return sorted(({"node": role.get(actor["Address"]["NodeID"], "gone"), "pid": actor["Pid"]}
                   for actor in state.actors().values()
                   if actor["State"] == "ALIVE" and actor["ActorClassName"].startswith("ServeReplica")
                   and actor["ActorClassName"].endswith(":ModelServer")), key=lambda r: r["node"])


def running_replicas() -> int:
    from ray import serve

    states = serve.status().applications[APP_NAME].deployments["ModelServer"].replica_states
    return sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING")


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Seconds until `condition()` holds; fails naming `what` after `timeout_s`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout_s} s (replicas: {replicas()})")


def one_on_each_node() -> bool:
    return [r["node"] for r in replicas()] == ["head", "worker"] and running_replicas() == 2


def postgres_roles(pid: int, admin_url: str) -> set[tuple[str, str]]:
    """(role, database) of each PostgreSQL session process `pid` holds: its Unix sockets' peers (ss,
    iproute2) are server backends, which pg_stat_activity names."""
    assert shutil.which("ss"), "this check reads Unix sockets with ss: install iproute2"
    table = subprocess.run(["ss", "-xpH"], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in table.splitlines()]
    # ss -x columns: netid, state, recv-q, send-q, local path, local inode, peer path, peer inode, users
    peers = {row[7] for row in rows if len(row) > 8 and f"pid={pid}," in row[8]}
    backends = {int(part.split("=")[1]) for row in rows if len(row) > 8 and row[5] in peers
                and ".s.PGSQL." in row[4] for part in row[8].split(",") if part.startswith("pid=")}
    engine = sa.create_engine(admin_url)
    try:
        with engine.connect() as connection:
            return {tuple(row) for row in connection.execute(sa.text(
                "SELECT usename, datname FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                {"pids": sorted(backends)})}
    finally:
        engine.dispose()


def question(url: str):
    """One question a call: its status, and what went wrong when it failed."""

    def one(number: int) -> dict:
        body = {"prompt": f"Where is my order A{10000 + number}?", "max_new_tokens": 4}
        request = urllib.request.Request(f"{url}/v1/generate", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return {"status": response.status, "error": None}
        except urllib.error.HTTPError as failure:
            return {"status": failure.code, "error": failure.read()[:200]}
        except OSError as failure:  # no HTTP answer at all (connection reset, refused, timeout)
            return {"status": 0, "error": repr(failure)[:200]}
    return one


def test_two_nodes_serve_through_a_worker_node_kill_and_rejoin(two_nodes, served_template, platform_db,
                                                               monkeypatch, tmp_path, instance):
    use_database(monkeypatch, new_database(platform_db, unique("two_nodes"),
                                             template=SERVED_TEMPLATE_DATABASE))
    database = PostgresResource()
    # What each node would mount as a secret: the serving role's URL, which names its password file.
    url_file = secrets.write_private(tmp_path / "secrets" / "serving-database-url", database.serving_url())
    monkeypatch.setenv("RAY_ADDRESS", two_nodes.address)  # the cluster, by its address alone
    ray_serve = RayServeResource(http_port=CLUSTER_HTTP_PORT, replicas=2, max_replicas_per_node=1)
    assert not ray_serve.is_local()
    settings = {**UNLIMITED, "database_url_file": str(url_file)}
    result = dg.materialize([serving_deployment], instance=instance,
                            resources={"database": database, "ray_serve": ray_serve},
                            run_config={"ops": {"serving_deployment": {"config": settings}}})
    assert result.success
    [event] = result.asset_materializations_for_node("serving_deployment")
    assert event.metadata["model_version"].value == served_template["version"]
    assert event.metadata["replicas"].value == 2
    url = event.metadata["url"].value

    # One replica on each node: each node's one CPU takes one replica (num_cpus=1 each).
    wait_for(one_on_each_node, REPLICA_TIMEOUT_S, "two running replicas, one on each node")

    # The worker's replica holds a session as the serving role, from the files it read itself: its
    # arguments and environment hold no password (nor do Ray's GCS and the deployment's arguments,
    # tests/test_serving.py), only the URL file's path.
    [worker_replica] = [r for r in replicas() if r["node"] == "worker"]
    database_name = sa.engine.make_url(database.serving_url()).database
    assert (SERVING, database_name) in postgres_roles(worker_replica["pid"], platform_db.admin_url())
    password = embedded_auth.password(platform_db._data_dir().resolve(), SERVING)
    process = psutil.Process(worker_replica["pid"])
    assert password not in " ".join(process.cmdline()) and password not in repr(process.environ())

    # The worker node listens on 127.0.0.1 as the head does, but for the one socket Ray has no
    # setting for (README, What listens where): each replica's inter-deployment gRPC server.
    worker_listeners = listeners(node_processes(two_nodes.worker_groups[0]))
    assert [(name, ip, port) for name, ip, port in worker_listeners
            if not on_loopback(ip) and not name.startswith("ray::ServeReplica")] == []
    assert {WORKER_FIRST_PORT, WORKER_FIRST_PORT + 1} <= {port for _, _, port in worker_listeners}

    with Traffic(question(url), RATE_PER_S) as traffic:
        time.sleep(4)
        killed_at = time.monotonic()
        killed = kill_node(two_nodes.worker_groups[0])
        assert worker_replica["pid"] in killed
        # Ray marks the node dead; Serve replaces its replica, which waits for a node with a free CPU.
        dead_after = wait_for(lambda: [r["node"] for r in replicas()] == ["head"] and running_replicas() == 1,
                              NODE_DEATH_TIMEOUT_S, "the killed node's replica gone, the head's serving")
        time.sleep(3)  # the head answers alone
        alone_until = time.monotonic()
        two_nodes.join_worker()
        rejoined_at = time.monotonic()
        back_after_rejoin = wait_for(one_on_each_node, REPLICA_TIMEOUT_S,
                                     "two running replicas, one on each node, after the worker rejoined")
        back_after_kill = time.monotonic() - killed_at
        time.sleep(3)

    outcomes = traffic.outcomes
    failed = [o for o in outcomes if o["status"] != 200]
    alone = [o for o in outcomes if killed_at + dead_after < o["at"] < alone_until]
    assert len(outcomes) >= 200  # 1% of them: at least 2 requests
    assert len(failed) <= 0.01 * len(outcomes), (len(failed), len(outcomes), failed[:3])
    assert alone and all(o["status"] == 200 for o in alone)  # the head alone answered every question
    after = [o for o in outcomes if o["at"] > rejoined_at + back_after_rejoin]
    assert after and all(o["status"] == 200 for o in after)
    failed_at = "; ".join(f"sent {o['at'] - killed_at:+.1f} s, failed {o['done'] - killed_at:+.1f} s: "
                          f"{o['status']} {o['error']!r}" for o in failed)
    print(f"\nworker node killed under load: {len(failed)} of {len(outcomes)} requests failed "
          f"({len(failed) / len(outcomes):.2%}{'; at ' + failed_at if failed else ''}); node marked dead "
          f"and its replica gone {dead_after:.1f} s after the kill; {len(alone)} answered by the head "
          f"alone; two replicas, one on each node, {back_after_rejoin:.1f} s after the worker rejoined "
          f"({back_after_kill:.1f} s after the kill)")
    print("worker node's listeners: " + ", ".join(f"{name} {ip}:{port}"
                                                  for name, ip, port in worker_listeners))
