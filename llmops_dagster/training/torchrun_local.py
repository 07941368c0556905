"""torchrun for one machine with nothing listening beyond 127.0.0.1.

`python -m llmops_dagster.training.torchrun_local [torchrun arguments] -m module ...` is torchrun
with its rendezvous store on 127.0.0.1 and the ranks' gloo (and NCCL bootstrap) sockets on the
loopback interface. torchrun's own stores (static, c10d, --standalone) listen on every interface
whatever --master-addr or --rdzv-endpoint say: TCPStore takes no bind address, only a listening
socket, which LoopbackRendezvous passes it.
"""

from __future__ import annotations

import os
import socket
import sys

from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import RendezvousParameters, rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous

BACKEND = "llmops-loopback"
LOOPBACK = "127.0.0.1"
TIMEOUT_S = 600  # torchrun's static rendezvous default
# Where the ranks' collectives open their sockets: gloo binds the interface's address (without
# this, the address the host name resolves to); NCCL's bootstrap likewise (not measured: no GPU here).
LOOPBACK_INTERFACE_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


class LoopbackRendezvous(StaticTCPRendezvous):
    """torchrun's static rendezvous for one node, its store served from a socket bound to 127.0.0.1
    on a free port (bound here, so no other process can take the port in between)."""

    def get_backend(self) -> str:
        return BACKEND

    def next_rendezvous(self):
        if self._store is None:
            listener = socket.create_server((LOOPBACK, 0))
            self.master_port = listener.getsockname()[1]
            self._store = TCPStore(LOOPBACK, self.master_port, self.world_size, True, self.timeout,
                                   multi_tenant=True, master_listen_fd=listener.detach())
        return super().next_rendezvous()


def create_handler(params: RendezvousParameters) -> LoopbackRendezvous:
    return LoopbackRendezvous(LOOPBACK, 0, rank=0, world_size=1, run_id=params.run_id,
                              timeout=int(params.config.get("timeout", TIMEOUT_S)))


def main(argv: list[str]) -> None:
    from torch.distributed import run

    rendezvous_handler_registry.register(BACKEND, create_handler)
    os.environ.update(LOOPBACK_INTERFACE_ENV)  # the ranks inherit this process's environment
    run.main(["--nnodes=1", f"--rdzv-backend={BACKEND}", f"--rdzv-endpoint={LOOPBACK}:0", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
