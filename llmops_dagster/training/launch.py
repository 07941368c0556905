"""Preparing a fine-tune: resolving the DeepSpeed config, checking settings before any process
starts, and building the launcher command line."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from llmops_dagster.training.base_model import check_loadable, module_names

DEEPSPEED_CONFIGS_DIR = Path(__file__).resolve().parent / "deepspeed_configs"
PRECISIONS = ("fp32", "bf16", "fp16")


class TrainingConfigError(ValueError):
    """A fine-tuning setting cannot work; the message names the setting."""


@dataclass(frozen=True)
class DeepSpeedOverrides:
    """Typed overrides of the DeepSpeed file; None keeps the file's value."""

    zero_stage: int | None = None
    micro_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    precision: str | None = None  # fp32, bf16 or fp16
    learning_rate: float | None = None


def load_deepspeed_config(name_or_path: str) -> dict:
    """A config from deepspeed_configs/ by name (without .json), or from a path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = DEEPSPEED_CONFIGS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        available = sorted(p.stem for p in DEEPSPEED_CONFIGS_DIR.glob("*.json"))
        raise TrainingConfigError(f"finetuned_checkpoint.deepspeed_config {name_or_path!r} is neither "
                                  f"a file nor one of {available}")
    return json.loads(path.read_text())


def resolve_deepspeed_config(base: dict, overrides: DeepSpeedOverrides, max_steps: int) -> dict:
    """Apply the overrides and fit the LR schedule to `max_steps` optimizer steps."""
    config = copy.deepcopy(base)
    if overrides.zero_stage is not None:
        if overrides.zero_stage not in (0, 1, 2, 3):
            raise TrainingConfigError(
                f"finetuned_checkpoint.zero_stage must be 0-3, got {overrides.zero_stage}")
        config.setdefault("zero_optimization", {})["stage"] = overrides.zero_stage
    if overrides.micro_batch_size is not None:
        if overrides.micro_batch_size < 1:
            raise TrainingConfigError("finetuned_checkpoint.micro_batch_size must be at least 1")
        config["train_micro_batch_size_per_gpu"] = overrides.micro_batch_size
    if overrides.gradient_accumulation_steps is not None:
        if overrides.gradient_accumulation_steps < 1:
            raise TrainingConfigError("finetuned_checkpoint.gradient_accumulation_steps must be at least 1")
        config["gradient_accumulation_steps"] = overrides.gradient_accumulation_steps
    if overrides.precision is not None:
        if overrides.precision not in PRECISIONS:
            raise TrainingConfigError(f"finetuned_checkpoint.precision must be one of {PRECISIONS}, "
                                      f"got {overrides.precision!r}")
        config["bf16"] = {"enabled": overrides.precision == "bf16"}
        config["fp16"] = {"enabled": overrides.precision == "fp16"}
    if overrides.learning_rate is not None:
        config.setdefault("optimizer", {}).setdefault("params", {})["lr"] = overrides.learning_rate
    scheduler = config.get("scheduler", {}).get("params")
    if scheduler is not None:
        lr = config.get("optimizer", {}).get("params", {}).get("lr")
        if lr is not None and "warmup_max_lr" in scheduler:
            scheduler["warmup_max_lr"] = lr
        if "total_num_steps" in scheduler:
            scheduler["total_num_steps"] = max_steps
        if "warmup_num_steps" in scheduler:
            scheduler["warmup_num_steps"] = min(scheduler["warmup_num_steps"], max(1, max_steps // 10))
    return config


def available_ranks() -> tuple[int, str]:
    """How many ranks this machine can run: GPUs when there are any, else CPU cores."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPUs"
    return os.cpu_count() or 1, "CPU cores"


def check_settings(base_model: str, num_processes: int, target_modules: list[str]) -> None:
    """Everything that can be known wrong before launching, each error naming its setting."""
    if num_processes < 1:
        raise TrainingConfigError("finetuned_checkpoint.num_processes must be at least 1")
    capacity, unit = available_ranks()
    if num_processes > capacity:
        raise TrainingConfigError(f"finetuned_checkpoint.num_processes={num_processes} but this "
                                  f"machine has {capacity} {unit}")
    check_loadable(base_model, setting="base model")
    names = module_names(base_model)
    missing = [m for m in target_modules if m not in names]
    if missing:
        linear = sorted(n for n in names if n.endswith("_proj"))
        raise TrainingConfigError(f"finetuned_checkpoint.target_modules {missing} are not modules of "
                                  f"the base model; it has {linear}")


def run_version(parts: dict) -> str:
    """Version of a fine-tune: hash of everything that decides its result (16 hex digits)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


TRAINING_MODULE = "llmops_dagster.training.train_lora"
TORCHRUN = [sys.executable, "-m", "llmops_dagster.training.torchrun_local"]
LOOPBACK = "127.0.0.1"
# A socket already listening on the rendezvous endpoint, handed to node 0's launcher (torchrun_local)
# by its file descriptor: its starter binds a free port and gives it to the other nodes, no race.
LISTEN_FD_ENV = "LLMOPS_RENDEZVOUS_LISTEN_FD"


def launch_command(run_file: Path, num_processes: int, launcher: str = "torchrun",
                   hostfile: str = "") -> list[str]:
    """torchrun (one node, nothing listening beyond 127.0.0.1: torchrun_local) or the deepspeed
    launcher (a hostfile for several nodes; its rank 0 store listens on every interface)."""
    if launcher == "torchrun":
        return [*TORCHRUN, f"--nproc_per_node={num_processes}",
                "-m", TRAINING_MODULE, "--config", str(run_file)]
    if launcher == "deepspeed":
        command = [sys.executable, "-m", "deepspeed.launcher.runner", f"--master_port={free_port()}"]
        command += [f"--hostfile={hostfile}"] if hostfile else [f"--num_gpus={num_processes}"]
        return command + ["--module", TRAINING_MODULE, "--config", str(run_file)]
    raise TrainingConfigError(f"trainer.launcher must be 'torchrun' or 'deepspeed', got {launcher!r}")


def ranks_per_node(num_processes: int, nodes: int) -> int:
    """The ranks each of `nodes` torchrun nodes runs: the fine-tune's ranks split evenly."""
    if nodes < 1:
        raise TrainingConfigError(f"trainer.nodes must be at least 1, got {nodes}")
    if num_processes % nodes:
        raise TrainingConfigError(f"finetuned_checkpoint.num_processes={num_processes} ranks cannot be "
                                  f"split evenly over trainer.nodes={nodes}")
    return num_processes // nodes


def node_command(run_file: Path, num_processes: int, nodes: int, node_rank: int,
                 endpoint: str) -> list[str]:
    """The launcher of node `node_rank` of a torchrun run over `nodes` nodes (static rendezvous at
    `endpoint`, host:port, served by node 0): the same command on every node but its rank. Node 0
    holds global rank 0, which reports to Dagster through Pipes."""
    return [*TORCHRUN, f"--nnodes={nodes}", f"--node-rank={node_rank}", f"--rdzv-endpoint={endpoint}",
            f"--nproc_per_node={ranks_per_node(num_processes, nodes)}",
            "-m", TRAINING_MODULE, "--config", str(run_file)]
