"""Preparing a fine-tune: resolving the DeepSpeed config, checking settings before any process
starts, and building the launcher command line."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from llmops_dagster.infra.settings import (
    DEPLOYMENT_FILE_ENV,
    DEPLOYMENT_FILE_NAME,
    SettingError,
    check_operator_owned,
    deployment_table,
)
from llmops_dagster.training.base_model import check_loadable, module_names
from llmops_dagster.training.run_config import DEEPSPEED_CONFIGS_DIR

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
    """A config from deepspeed_configs/ by name (without .json), or a file in the operator's folder
    of DeepSpeed configs (the deployment setting deepspeed_config_dir). A DeepSpeed config says
    where DeepSpeed writes (monitors, the profiler, NVMe offload), so run config picks among the
    files the operator put there, never any path."""
    shipped = {p.stem: p for p in DEEPSPEED_CONFIGS_DIR.glob("*.json")}
    if name_or_path in shipped:
        return json.loads(shipped[name_or_path].read_text())
    setting = f"finetuned_checkpoint.deepspeed_config {name_or_path!r}"
    try:
        folder = training_deployment().deepspeed_config_dir
        path = Path(folder, name_or_path) if folder else None
        if path is not None and not path.is_file() and path.with_suffix(".json").is_file():
            path = path.with_suffix(".json")
        path = path.resolve() if path is not None else None  # a link out of the folder leaves it
        if path is None or not path.is_file() or not path.is_relative_to(Path(folder).resolve()):
            where = (f"a file in {folder}" if folder else f"a file in the folder that "
                     f"{DEPLOYMENT_ENV['deepspeed_config_dir']} names (unset)")
            raise TrainingConfigError(f"{setting} is neither one of {sorted(shipped)} nor {where}")
        check_operator_owned(path, setting)
    except SettingError as error:
        raise TrainingConfigError(str(error)) from error
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
    raise TrainingConfigError(f"{DEPLOYMENT_ENV['launcher']} must be one of {list(LAUNCHERS)}, "
                              f"got {launcher!r}")


def ranks_per_node(num_processes: int, nodes: int) -> int:
    """The ranks each of `nodes` torchrun nodes runs: the fine-tune's ranks split evenly."""
    if nodes < 1:
        raise TrainingConfigError(f"{DEPLOYMENT_ENV['nodes']} must be at least 1, got {nodes}")
    if num_processes % nodes:
        raise TrainingConfigError(f"finetuned_checkpoint.num_processes={num_processes} ranks cannot be "
                                  f"split evenly over {nodes} trainer nodes ({DEPLOYMENT_ENV['nodes']})")
    return num_processes // nodes


def node_command(run_file: Path, num_processes: int, nodes: int, node_rank: int,
                 endpoint: str) -> list[str]:
    """The launcher of node `node_rank` of a torchrun run over `nodes` nodes (static rendezvous at
    `endpoint`, host:port, served by node 0): the same command on every node but its rank. Node 0
    holds global rank 0, which reports to Dagster through Pipes."""
    return [*TORCHRUN, f"--nnodes={nodes}", f"--node-rank={node_rank}", f"--rdzv-endpoint={endpoint}",
            f"--nproc_per_node={ranks_per_node(num_processes, nodes)}",
            "-m", TRAINING_MODULE, "--config", str(run_file)]


LAUNCHERS = ("torchrun", "deepspeed")
DEPLOYMENT_SECTION = "trainer"  # the deployment file's table of the settings below
# Where each deployment setting of the trainer is read: its environment variable (wins) and its key
# in the deployment file's [trainer] table.
DEPLOYMENT_ENV = {
    "launcher": "LLMOPS_TRAINER_LAUNCHER",
    "hostfile": "LLMOPS_TRAINER_HOSTFILE",
    "nodes": "LLMOPS_TRAINER_NODES",
    "rendezvous_endpoint": "LLMOPS_TRAINER_RENDEZVOUS_ENDPOINT",
    "node_start_command": "LLMOPS_TRAINER_NODE_START_COMMAND",
    "deepspeed_config_dir": "LLMOPS_TRAINER_DEEPSPEED_CONFIG_DIR",
}


@dataclass(frozen=True)
class TrainingDeployment:
    """Where and how the fine-tune's processes start. These decide what the platform executes and
    where it connects, so they are the operator's: the platform's environment or the deployment
    file, never run config (which whoever launches a run writes)."""

    launcher: str = "torchrun"  # 'torchrun' (one node, or `nodes`) or 'deepspeed' (hostfile)
    hostfile: str = ""  # the deepspeed launcher's hosts (it reaches them over ssh/pdsh)
    nodes: int = 1  # torchrun nodes, one launcher each; node 0 runs here and holds global rank 0
    # host:port of node 0's rendezvous store, open between the nodes; empty: 127.0.0.1, free port
    rendezvous_endpoint: str = ""
    # Prefix that starts node {node_rank}'s launcher on its machine (srun, ssh); empty: this machine
    node_start_command: tuple[str, ...] = ()
    # The operator's DeepSpeed config files, which finetuned_checkpoint.deepspeed_config may name
    # (by file name) beside the shipped ones; empty: only the shipped ones
    deepspeed_config_dir: str = ""


def deployment_setting_message(name: str) -> str:
    """Where trainer setting `name` is set instead of run config."""
    return (f"trainer.{name} is a deployment setting, not run config: set {DEPLOYMENT_ENV[name]} in "
            f"the platform's environment, or `{name}` in the [{DEPLOYMENT_SECTION}] table of "
            f"$LLMOPS_HOME/{DEPLOYMENT_FILE_NAME} (or of the file {DEPLOYMENT_FILE_ENV} names)")


def deployment_settings_in(run_config: Mapping | None) -> list[str]:
    """One message for each deployment setting that `run_config` (launchpad, `llmops run
    --config`) tries to set under resources.trainer.config; empty when it sets none."""
    trainer = ((run_config or {}).get("resources") or {}).get("trainer") or {}
    given = trainer.get("config") or {}
    return [deployment_setting_message(name) for name in DEPLOYMENT_ENV if name in given]


def refuse_deployment_settings(run_config: Mapping | None) -> None:
    """Raise TrainingConfigError naming every deployment setting `run_config` tries to set."""
    found = deployment_settings_in(run_config)
    if found:
        raise TrainingConfigError("; ".join(found) + ". Nothing was run.")


def training_deployment(environ: Mapping[str, str] = os.environ) -> TrainingDeployment:
    """The trainer's deployment settings: each from its environment variable when set, else from
    the deployment file's [trainer] table, else the default (one node on this machine under
    torchrun). Errors name the variable or the file."""
    table, path = deployment_table(DEPLOYMENT_SECTION)
    unknown = sorted(set(table) - set(DEPLOYMENT_ENV))
    if unknown:
        raise SettingError(f"deployment file {path}: [{DEPLOYMENT_SECTION}] has unknown settings "
                           f"{unknown}; known: {sorted(DEPLOYMENT_ENV)}")
    values = {}
    for spec in fields(TrainingDeployment):
        variable = DEPLOYMENT_ENV[spec.name]
        if environ.get(variable, "").strip():
            values[spec.name] = _parse(spec.name, environ[variable].strip(), variable)
        elif spec.name in table:
            values[spec.name] = _parse(spec.name, table[spec.name],
                                       f"`{spec.name}` in [{DEPLOYMENT_SECTION}] of {path}")
    deployment = TrainingDeployment(**values)
    if deployment.hostfile:  # its hosts are where the deepspeed launcher runs commands
        check_operator_owned(Path(deployment.hostfile), DEPLOYMENT_ENV["hostfile"])
    return deployment


def _parse(name: str, value, where: str):
    """Deployment setting `name` from `value` (a string from the environment, or a TOML value);
    `where` names its source in errors."""
    if name == "nodes":
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SettingError(f"{where} must be a whole number of nodes, at least 1, got {value!r}")
        return value
    if name == "node_start_command":
        if isinstance(value, str):
            value = shlex.split(value)
        if not isinstance(value, list) or not all(isinstance(part, str) for part in value):
            raise SettingError(f"{where} must be a command: a list of strings (file) or a shell-quoted "
                               f"string (environment), got {value!r}")
        return tuple(value)
    if not isinstance(value, str):
        raise SettingError(f"{where} must be a string, got {value!r}")
    if name == "launcher" and value not in LAUNCHERS:
        raise SettingError(f"{where} must be one of {list(LAUNCHERS)}, got {value!r}")
    return value
