"""torchrun with its rendezvous store bound to one address: 127.0.0.1 on one machine.

`python -m llmops_dagster.training.torchrun_local [torchrun arguments] -m module ...` is torchrun
with its rendezvous store on 127.0.0.1 and the ranks' gloo (and NCCL bootstrap) sockets on the
loopback interface. torchrun's own stores (static, c10d, --standalone) listen on every interface
whatever --master-addr or --rdzv-endpoint say: TCPStore takes no bind address, only a listening
socket, which BoundRendezvous passes it.

Several nodes: `--nnodes=N --node-rank=K --rdzv-endpoint=HOST:PORT` on each node (one launcher a
node, torchrun's static rendezvous): node 0's launcher binds the store to HOST:PORT, the others
connect to it. HOST is 127.0.0.1 when every node runs on this machine (the ranks' sockets then stay
on loopback too), node 0's private address on a cluster (the ranks' sockets then use the interface
in GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME). Node 0 may be handed a socket already listening on
HOST:PORT (its descriptor in LISTEN_FD_ENV, as its starter binds a free port and starts the other
nodes on it without a race).
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import os
import socket
import sys

from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import RendezvousParameters, rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from llmops_dagster.training.launch import LISTEN_FD_ENV, LOOPBACK

BACKEND = "llmops-bound"
TIMEOUT_S = 600  # torchrun's static rendezvous default: how long node 0 waits for the others
# Where the ranks' collectives open their sockets: gloo binds the interface's address (without
# this, the address the host name resolves to); NCCL's bootstrap likewise (not measured: no GPU here).
LOOPBACK_INTERFACE_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


class BoundRendezvous(StaticTCPRendezvous):
    """torchrun's static rendezvous, its store served (by node 0) from a socket bound to the
    endpoint's address only: on a free port when the endpoint's port is 0, bound here, so no other
    process can take the port in between; or a listening socket handed over by descriptor."""

    def __init__(self, *args, listen_fd: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.listen_fd = listen_fd

    def get_backend(self) -> str:
        return BACKEND

    def next_rendezvous(self):
        if self._store is None and self.rank == 0:
            if self.listen_fd is not None:
                listener = socket.socket(fileno=self.listen_fd)
            else:
                listener = socket.create_server((self.master_addr, self.master_port))
            self.master_port = listener.getsockname()[1]
            self._store = TCPStore(self.master_addr, self.master_port, self.world_size, True,
                                   self.timeout, multi_tenant=True, master_listen_fd=listener.detach())
        return super().next_rendezvous()


def create_handler(params: RendezvousParameters, listen_fd: int | None = None) -> BoundRendezvous:
    host, port = parse_rendezvous_endpoint(params.endpoint, 0)
    return BoundRendezvous(host, port, rank=int(params.config.get("rank", 0)),
                           world_size=params.max_nodes, run_id=params.run_id,
                           timeout=int(params.config.get("timeout", TIMEOUT_S)), listen_fd=listen_fd)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _node_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This launcher's node options, taken from the torchrun arguments (those before -m); the rest
    is passed to torchrun as it is."""
    split = argv.index("-m") if "-m" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="torchrun_local", allow_abbrev=False)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=0)
    parser.add_argument("--rdzv-endpoint", "--rdzv_endpoint", dest="endpoint", default=f"{LOOPBACK}:0")
    nodes, rest = parser.parse_known_args(argv[:split])
    return nodes, rest + argv[split:]


def main(argv: list[str]) -> None:
    from torch.distributed import run

    nodes, rest = _node_arguments(argv)
    host, port = parse_rendezvous_endpoint(nodes.endpoint, 0)
    fd = os.environ.pop(LISTEN_FD_ENV, None)  # node 0's alone, never the ranks'
    if not 0 <= nodes.node_rank < nodes.nnodes:
        raise SystemExit(f"torchrun_local: --node-rank {nodes.node_rank} is not in 0..{nodes.nnodes - 1}")
    if nodes.nnodes > 1 and port == 0 and not (nodes.node_rank == 0 and fd is not None):
        raise SystemExit("torchrun_local: several nodes need the rendezvous port in --rdzv-endpoint")
    rendezvous_handler_registry.register(
        BACKEND, functools.partial(create_handler, listen_fd=int(fd) if fd is not None else None))
    if is_loopback(host):
        os.environ.update(LOOPBACK_INTERFACE_ENV)  # the ranks inherit this process's environment
    run.main([f"--nnodes={nodes.nnodes}", f"--rdzv-backend={BACKEND}", f"--rdzv-endpoint={host}:{port}",
              f"--rdzv-conf=rank={nodes.node_rank}", *rest])


if __name__ == "__main__":
    main(sys.argv[1:])
