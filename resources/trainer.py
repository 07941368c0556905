"""Launching the DeepSpeed fine-tune as a process tree through Dagster Pipes, on one node or on
several torchrun nodes."""

import collections
import contextlib
import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import psutil
from pydantic import Field

from llmops_dagster.infra.settings import SettingError
from llmops_dagster.training import launch
from llmops_dagster.training.launch import LISTEN_FD_ENV, LOOPBACK

REMOTE_STOP_GRACE_S = 10  # SIGTERM to a remote node's starter (srun forwards it), then SIGKILL
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal a process gets when its parent dies


@dataclass
class NodeLaunch:
    """One node's launcher as this process starts it: the command, what it adds to the
    environment, the descriptors it inherits, and whether it runs on another machine."""

    rank: int
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    pass_fds: tuple[int, ...] = ()
    remote: bool = False


class TrainerResource(dg.ConfigurableResource):
    """Starts the standalone training script under torchrun or the deepspeed launcher, each node's
    launcher in a session of its own (so every tree can be stopped), and streams its Pipes messages
    (global rank 0's, on node 0, which runs here). What it executes and where (the launcher, its
    nodes, hostfile, rendezvous endpoint and node start command) are deployment settings
    (LLMOPS_TRAINER_* or the deployment file's [trainer] table), never run config."""

    threads_per_rank: int = Field(
        default=1, description="OMP_NUM_THREADS of each CPU rank (ranks x threads <= cores)."
    )

    def deployment(self) -> launch.TrainingDeployment:
        """The operator's settings of the launch, read now (environment, deployment file)."""
        try:
            return launch.training_deployment()
        except SettingError as error:
            raise dg.Failure(description=str(error)) from error

    @property
    def nodes(self) -> int:
        return self.deployment().nodes

    @property
    def launcher(self) -> str:
        return self.deployment().launcher

    def run(self, context: dg.AssetExecutionContext, run_file: Path, num_processes: int,
            extra_env: dict[str, str] | None = None) -> tuple[list, list]:
        """Train; return (the results and the custom messages reported through Pipes)."""
        with dg.open_pipes_session(
            context=context,
            context_injector=dg.PipesTempFileContextInjector(),
            message_reader=dg.PipesTempFileMessageReader(),
        ) as session:
            env = {**os.environ, **session.get_bootstrap_env_vars(),
                   "OMP_NUM_THREADS": str(self.threads_per_rank), **(extra_env or {})}
            with self.node_launches(run_file, num_processes) as nodes:
                for node in nodes:
                    context.log.info(f"launching{f' node {node.rank}' if len(nodes) > 1 else ''}: "
                                     f"{' '.join(node.command)}")
                failed = self._run_nodes(nodes, env, cwd=run_file.parent)
            if failed is not None:
                node, code, lines = failed
                cause = next((line.strip() for line in lines if _is_cause(line)), "see last_output")
                where = f" on node {node}" if len(nodes) > 1 else ""
                raise dg.Failure(
                    description=f"training exited with code {code}{where} "
                    f"({'killed by signal ' + str(-code) if code < 0 else cause}); "
                    f"re-run to resume from the last complete checkpoint",
                    metadata={"last_output": dg.MetadataValue.text("".join(lines))},
                )
        return list(session.get_results()), list(session.get_custom_messages())

    @contextlib.contextmanager
    def node_launches(self, run_file: Path, num_processes: int) -> Iterator[list[NodeLaunch]]:
        """The launchers to start, node 0 first. With several nodes and no rendezvous_endpoint, a
        socket listening on 127.0.0.1 (free port) is handed to node 0's launcher, whose store takes
        it over, so the port the others are given cannot be taken in between; this process holds
        its copy open (accepting nothing) until the block ends."""
        deployment = self.deployment()
        try:
            if deployment.launcher != "torchrun" and deployment.nodes > 1:
                raise launch.TrainingConfigError(
                    f"{launch.DEPLOYMENT_ENV['nodes']} applies to launcher 'torchrun'; the deepspeed "
                    f"launcher takes its nodes from {launch.DEPLOYMENT_ENV['hostfile']}")
            launch.ranks_per_node(num_processes, deployment.nodes)
            if deployment.nodes == 1:
                yield [NodeLaunch(0, launch.launch_command(run_file, num_processes, deployment.launcher,
                                                           deployment.hostfile))]
                return
            with contextlib.ExitStack() as stack:
                endpoint, node0 = deployment.rendezvous_endpoint, {}
                if not endpoint:
                    listener = stack.enter_context(socket.create_server((LOOPBACK, 0)))
                    endpoint = f"{LOOPBACK}:{listener.getsockname()[1]}"
                    node0 = {"env": {LISTEN_FD_ENV: str(listener.fileno())},
                             "pass_fds": (listener.fileno(),)}
                nodes = [NodeLaunch(0, launch.node_command(run_file, num_processes, deployment.nodes, 0,
                                                           endpoint), **node0)]
                for rank in range(1, deployment.nodes):
                    prefix = [part.format(node_rank=rank) for part in deployment.node_start_command]
                    command = launch.node_command(run_file, num_processes, deployment.nodes, rank, endpoint)
                    nodes.append(NodeLaunch(rank, prefix + command, remote=bool(prefix)))
                yield nodes
        except launch.TrainingConfigError as error:
            raise dg.Failure(description=str(error)) from error

    @staticmethod
    def _run_nodes(nodes: list[NodeLaunch], env: dict,
                   cwd: Path) -> tuple[int, int, list[str]] | None:
        """Start every node's launcher in a session of its own and forward their output (each line
        prefixed with its node when there are several); None when all succeeded, else (the node
        that failed first, its exit code, the last lines). When one node fails, or this process is
        interrupted, every node's tree is stopped: a rank's own fault hook reaches only the
        launchers above it, never another node's."""
        lines: queue.Queue = queue.Queue()
        processes: list[subprocess.Popen] = []
        stop_with_this_process = _stop_with_parent(os.getpid())
        readers = []
        last = collections.deque(maxlen=200)
        try:
            for node in nodes:
                process = subprocess.Popen(
                    node.command, env={**env, **node.env}, cwd=cwd, pass_fds=node.pass_fds,
                    start_new_session=True, preexec_fn=stop_with_this_process,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                processes.append(process)
                prefix = f"[node {node.rank}] " if len(nodes) > 1 else ""
                reader = threading.Thread(target=_forward, args=(process.stdout, prefix, lines), daemon=True)
                reader.start()
                readers.append(reader)
            while True:
                with contextlib.suppress(queue.Empty):
                    line = lines.get(timeout=0.2)
                    sys.stdout.write(line)
                    last.append(line)
                codes = [process.poll() for process in processes]
                failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
                if failed is not None or all(code == 0 for code in codes):
                    break
        except BaseException:
            _stop(nodes, processes)
            raise
        if failed is not None:
            _stop(nodes, processes)  # a rank may have killed only part of a tree, or one node of several
        for reader in readers:
            reader.join(timeout=5)
        while not lines.empty():
            line = lines.get()
            sys.stdout.write(line)
            last.append(line)
        return None if failed is None else (nodes[failed].rank, codes[failed], list(last))


def _stop_with_parent(parent: int):
    """A preexec_fn that has the kernel send the launcher SIGTERM when the thread that started it
    dies (Linux PR_SET_PDEATHSIG; None elsewhere). A run worker killed with its process group (a
    daemon stopped with SIGKILL) thus stops its training too: torchrun and the deepspeed launcher
    stop their ranks on SIGTERM, where SIGKILL would leave the ranks (in sessions of their own)
    training into the folder a retry of the run resumes from."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_death_signal() -> None:  # in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGTERM)
    return set_death_signal


def _forward(stream, prefix: str, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(prefix + line)
    stream.close()


def _stop(nodes: list[NodeLaunch], processes: list[subprocess.Popen]) -> None:
    """Stop every node's launcher and what it started: SIGKILL for a local node; a remote node's
    starter gets SIGTERM first (srun forwards it to the node's launcher), SIGKILL after a grace
    period. torchrun starts each rank in a session of its own, so the launcher's process group
    alone would leave the ranks running: its descendants are listed before anything is killed."""
    trees = [_descendants(process.pid) for process in processes]
    for node, process, tree in zip(nodes, processes, trees, strict=True):
        if node.remote:
            _signal_group(process, signal.SIGTERM)
        else:
            _kill(process, tree)
    deadline = time.monotonic() + REMOTE_STOP_GRACE_S
    for node, process, tree in zip(nodes, processes, trees, strict=True):
        if node.remote:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            _kill(process, tree)
        process.wait()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill(process: subprocess.Popen, tree: list[psutil.Process]) -> None:
    _signal_group(process, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _is_cause(line: str) -> bool:
    """A line of the ranks' output that says why training stopped."""
    line = line.split("] ", 1)[1] if line.startswith("[node ") else line
    text = line.strip().split("]: ", 1)[-1] if line.startswith("[rank") else line.strip()
    return text.startswith("training diverged") or (
        "Error" in text and "ChildFailedError" not in text and "gloo" not in text
    )
