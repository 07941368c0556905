"""Training on two nodes, shown on one machine: the finetuned_checkpoint asset launched, with the
deployment setting LLMOPS_TRAINER_NODES=2 in the environment, as two torchrun nodes (--nnodes 2,
node ranks 0 and 1, one DeepSpeed rank each, gloo on CPU, rendezvous on 127.0.0.1) through Dagster
Pipes; the two-node run SIGKILLed mid-way, then resumed on one node (2 ranks). Also the layout's
and the artifact storage's settings.
Touches the embedded PostgreSQL (a database of its own), real torchrun and DeepSpeed processes and
a temporary artifact root."""

import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import dagster as dg
import psutil
import pytest
from test_finetune import failure_message, metadata

from assets.dataset import raw_examples, validated_dataset
from assets.prompts import prompt_set
from assets.training import base_model, finetuned_checkpoint
from llmops_dagster.training import checkpoints, launch
from llmops_dagster.training.launch import DEPLOYMENT_ENV
from llmops_dagster.training.run_config import read_history
from llmops_dagster.training.train_lora import FAULT_ENV
from resources.artifacts import ArtifactStorageError, ArtifactStore
from resources.trainer import NodeLaunch, TrainerResource

TINY_BASE = {"vocab_size": 400, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_FINETUNE = {"num_processes": 2, "max_steps": 16, "checkpoint_every": 4, "micro_batch_size": 4,
                 "seq_len": 64, "learning_rate": 0.01}
TWO_NODES, ONE_NODE = 2, 1
TRAINER = TrainerResource()


@pytest.fixture
def stage(resources, instance, monkeypatch):
    """Data stage and base model materialized once; returns a function that runs the fine-tune
    on a given number of nodes (the deployment setting, from the environment)."""
    result = dg.materialize(
        [raw_examples, validated_dataset, prompt_set, base_model],
        resources={**resources, "trainer": TRAINER}, instance=instance,
        run_config={"ops": {"raw_examples": {"config": {"synthetic_rows": 300}},
                            "base_model": {"config": TINY_BASE}}},
    )
    assert result.success

    def finetune(nodes: int, **overrides):
        monkeypatch.setenv(DEPLOYMENT_ENV["nodes"], str(nodes))
        return dg.materialize(
            [finetuned_checkpoint, prompt_set, base_model], selection=[finetuned_checkpoint],
            resources={**resources, "trainer": TRAINER}, instance=instance, raise_on_error=False,
            run_config={"ops": {"finetuned_checkpoint": {"config": {**TINY_FINETUNE, **overrides}}}},
        )
    return finetune


def training_processes() -> list[psutil.Process]:
    """Live launchers and ranks of any fine-tune (their command lines name a run file)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.info["status"] != psutil.STATUS_ZOMBIE and "train_config.json" in cmdline and (
                "torchrun_local" in cmdline or "train_lora" in cmdline):
            found.append(process)
    return found


@dataclass
class Layout:
    """What a fine-tune ran as: each launcher's node arguments and its ranks, and every address
    one of them listened on."""

    launchers: dict[int, tuple[str, ...]] = field(default_factory=dict)  # pid: --nnodes, --node-rank
    ranks: dict[int, set[int]] = field(default_factory=dict)  # launcher pid: its ranks' pids
    listening: set[str] = field(default_factory=set)

    def nodes(self) -> list[tuple[tuple[str, ...], int]]:
        """(node arguments, ranks) of each launcher, in node order."""
        return sorted((args, len(self.ranks.get(pid, ()))) for pid, args in self.launchers.items())


@contextlib.contextmanager
def process_layout(artifacts: ArtifactStore):
    """Samples, every 0.2 s while the block runs, the fine-tune processes under this test's
    artifact root."""
    root = str(artifacts.root_path())
    layout = Layout()
    done = threading.Event()

    def sample():
        while not done.wait(0.2):
            for process in training_processes():
                cmdline = process.info["cmdline"]
                if not any(root in part for part in cmdline):
                    continue
                with contextlib.suppress(psutil.Error):
                    if "llmops_dagster.training.torchrun_local" in cmdline:
                        layout.launchers[process.pid] = tuple(
                            a for a in cmdline if a.startswith(("--nnodes", "--node-rank")))
                    elif "llmops_dagster.training.train_lora" in cmdline:
                        layout.ranks.setdefault(process.ppid(), set()).add(process.pid)
                    layout.listening.update(c.laddr.ip for c in process.net_connections("tcp")
                                            if c.status == psutil.CONN_LISTEN)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield layout
    finally:
        done.set()
        sampler.join()


def no_training_left(artifacts: ArtifactStore, within_s: float = 5.0) -> list[str]:
    """Command lines of fine-tune processes under this artifact root still alive after `within_s`."""
    root = str(artifacts.root_path())
    deadline = time.monotonic() + within_s
    while True:
        left = [" ".join(p.info["cmdline"]) for p in training_processes()
                if any(root in part for part in p.info["cmdline"])]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def rank0_logs(instance, result) -> list[str]:
    return [entry.user_message for entry in instance.all_logs(result.run_id)]


def test_two_nodes_train_then_killed_mid_run_resume_on_one_node(stage, resources, instance, monkeypatch):
    artifacts = resources["artifacts"]

    # 1. Two nodes, one rank each, to the end: global rank 0 (node 0) reports every step via Pipes.
    with process_layout(artifacts) as layout:
        short = stage(TWO_NODES, max_steps=4)
    assert short.success, failure_message(short)
    meta = metadata(short)
    assert meta["world_size"] == 2 and meta["global_step"] == 4 and meta["steps_reported_via_pipes"] == 4
    assert layout.nodes() == [(("--nnodes=2", "--node-rank=0"), 1), (("--nnodes=2", "--node-rank=1"), 1)]
    assert layout.listening == {"127.0.0.1"}  # the rendezvous store and the ranks' gloo sockets

    # 2. The full run on two nodes, SIGKILLed after step 10 by global rank 0's fault hook: it kills
    #    node 0's launcher tree; the trainer stops node 1's. Step 8 is the last complete checkpoint.
    monkeypatch.setenv(FAULT_ENV, "kill-at-step:10")
    with process_layout(artifacts) as layout:
        crashed = stage(TWO_NODES)
    assert not crashed.success
    message = failure_message(crashed)
    assert "killed by signal 9" in message and "on node 0" in message, message
    assert layout.nodes() == [(("--nnodes=2", "--node-rank=0"), 1), (("--nnodes=2", "--node-rank=1"), 1)]
    assert layout.listening == {"127.0.0.1"}
    assert no_training_left(artifacts) == []
    [version_dir] = [d for d in (artifacts.root_path() / "finetunes").iterdir()
                     if d.name != meta["version"]]
    root = version_dir / "deepspeed"
    assert checkpoints.latest_complete(root) == ("step-000008", 8)
    assert json.loads((root / "step-000008" / checkpoints.COMPLETE).read_text())["world_size"] == 2
    assert not (version_dir / "DONE").exists()
    logs = rank0_logs(instance, crashed)  # rank 0's Pipes log lines, in the Dagster run's log
    assert "checkpoint step-000008 complete" in logs and "fault injection: SIGKILL after step 10" in logs

    # 3. The same fine-tune on one node (2 ranks, world size 2 as before): it resumes from step 8.
    monkeypatch.delenv(FAULT_ENV)
    with process_layout(artifacts) as layout:
        done = stage(ONE_NODE)
    assert done.success, failure_message(done)
    meta = metadata(done)
    assert meta["version"] == version_dir.name
    assert meta["resumed_from_step"] == 8 and meta["global_step"] == 16 and meta["world_size"] == 2
    assert meta["steps_reported_via_pipes"] == 8  # steps 9-16 streamed from rank 0
    assert layout.nodes() == [((), 2)] and layout.listening == {"127.0.0.1"}
    history = read_history(root.parent / "metrics.jsonl")
    assert [h["step"] for h in history] == list(range(1, 17))
    assert history[-1]["loss"] < history[0]["loss"]
    assert meta["eval_loss"] < meta["eval_loss_base_model"]
    assert no_training_left(artifacts) == []


def test_a_failed_node_stops_the_others_ranks_included(tmp_path):
    """Node 1 exits with an error while node 0's rank is still running: the trainer stops node 0's
    launcher and its rank, which torchrun starts in a session of its own (so the launcher's process
    group alone would leave it running)."""
    pid_file = tmp_path / "rank.pid"
    rank = tmp_path / "rank.py"
    rank.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                    "time.sleep(120)\n")
    wait_then_fail = (f"import os, sys, time\nwhile not os.path.exists({str(pid_file)!r}): time.sleep(0.1)\n"
                      "print('node 1 fails', flush=True)\nsys.exit(3)\n")
    nodes = [NodeLaunch(0, [*launch.TORCHRUN, "--nproc_per_node=1", str(rank)]),
             NodeLaunch(1, [sys.executable, "-c", wait_then_fail])]
    started = time.monotonic()
    node, code, lines = TrainerResource._run_nodes(nodes, dict(os.environ), cwd=tmp_path)
    assert (node, code) == (1, 3) and "[node 1] node 1 fails\n" in lines
    assert time.monotonic() - started < 60
    assert not alive(int(pid_file.read_text()))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_node_layout_settings(tmp_path, monkeypatch):
    """The node layout comes from the deployment settings in the environment."""
    run_file = tmp_path / "train_config.json"
    monkeypatch.setenv(DEPLOYMENT_ENV["nodes"], "2")
    monkeypatch.setenv(DEPLOYMENT_ENV["rendezvous_endpoint"], "10.0.0.1:29650")
    monkeypatch.setenv(DEPLOYMENT_ENV["node_start_command"], "srun --nodes=1 --relative={node_rank}")
    with TRAINER.node_launches(run_file, 16) as nodes:
        assert [(n.rank, n.remote, n.pass_fds) for n in nodes] == [(0, False, ()), (1, True, ())]
        assert nodes[1].command[:3] == ["srun", "--nodes=1", "--relative=1"]
        for node in nodes:
            assert node.command[-8:-4] == ["--nnodes=2", f"--node-rank={node.rank}",
                                           "--rdzv-endpoint=10.0.0.1:29650", "--nproc_per_node=8"]
    monkeypatch.delenv(DEPLOYMENT_ENV["rendezvous_endpoint"])
    monkeypatch.delenv(DEPLOYMENT_ENV["node_start_command"])
    with TRAINER.node_launches(run_file, 2) as nodes:  # one machine: a free port held for node 0
        [endpoint] = {a for n in nodes for a in n.command if a.startswith("--rdzv-endpoint=")}
        assert endpoint.startswith("--rdzv-endpoint=127.0.0.1:") and not endpoint.endswith(":0")
        assert len(nodes[0].pass_fds) == 1 and nodes[1].pass_fds == ()
        assert not any(n.remote for n in nodes)
    uneven = r"num_processes=3 ranks cannot be split evenly over 2 trainer nodes \(LLMOPS_TRAINER_NODES\)"
    with pytest.raises(dg.Failure, match=uneven):
        with TRAINER.node_launches(run_file, 3):
            pass
    monkeypatch.setenv(DEPLOYMENT_ENV["launcher"], "deepspeed")
    with pytest.raises(dg.Failure, match="LLMOPS_TRAINER_NODES applies to launcher 'torchrun'"):
        with TRAINER.node_launches(run_file, 2):
            pass


def test_artifact_storage_is_a_setting(tmp_path):
    mount = tmp_path / "mnt"
    with pytest.raises(ArtifactStorageError, match="does not exist"):
        ArtifactStore(root=str(mount), storage="shared").version_dir("finetunes", "v")
    assert not mount.exists()  # a missing mount is never made on this node's disk
    with pytest.raises(ArtifactStorageError, match="needs artifacts.root"):
        ArtifactStore(storage="shared").root_path()
    with pytest.raises(ArtifactStorageError, match="must be 'local' or 'shared'"):
        ArtifactStore(root=str(mount), storage="s3").root_path()
    mount.mkdir()
    shared = ArtifactStore(root=str(mount), storage="shared")
    folder = shared.write_version("prompts", "v1", lambda d: (d / "a" / "b").mkdir(parents=True))
    version, same = shared.write_content_addressed("raw", lambda d: (d / "rows.jsonl").write_text("{}\n"))
    assert folder == mount / "prompts" / "v1" and (folder / "a" / "b").is_dir()
    assert same == shared.version_dir("raw", version) and (same / "rows.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in (mount / "prompts").iterdir()) == ["v1"]  # no staging left
