"""One fine-tune, planned and summarized: the inputs it builds on, its warm-start source, its version
and run file (the plan), and what the ranks report when it is done (the summary)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from llmops_dagster.feedback.preferences import PAIRS_FILE, PreferenceSetProduct
from llmops_dagster.prompts.templates import SPLIT_FILES, PromptSetVersion
from llmops_dagster.training import launch
from llmops_dagster.training.base_model import BaseModelProduct
from llmops_dagster.training.run_config import (
    DEFAULTS_BY_KIND,
    FinetuneSettings,
    RunConfig,
    read_history,
    write_run_config,
)

RUN_FILE = "train_config.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
DONE_MARKER = "DONE"  # written by the ranks once adapter and merged model are saved
# The settings a warm-started adapter must share with this fine-tune (the adapter's tensor shapes).
LORA_SHAPE = ("lora_r", "lora_alpha", "target_modules", "modules_to_save")
# Settings left out of the version hash: a fresh init hashes without them, so that a retrain on
# unchanged data reproduces production's version; a warm start hashes its own steps and source.
UNHASHED = (*launch.DeepSpeedOverrides.__dataclass_fields__, "warm_start", "warm_start_steps")
# Hashed only when the fine-tune has a preference step: without one they change nothing it makes.
PREFERENCE_SETTINGS = ("preference_steps", "dpo_beta", "min_preference_pairs")


@dataclass(kw_only=True)
class WarmStartSettings:
    """Whether and how long a fine-tune continues from production's adapter, declared once: the
    finetuned_checkpoint asset's config and the loop's retrain settings take them from here."""

    warm_start: bool = field(default=False, metadata={
        "help": "Start the LoRA weights from the production model's adapter when it has the same "
        "base model and LoRA settings (a retrain continues where production is; the loop's sensors "
        "ask for it with fewer steps) when this run has new data or prompts; otherwise a fresh "
        "init at max_steps."})
    warm_start_steps: int = field(default=200, metadata={
        "ge": 1, "help": "Optimizer steps of a warm start (max_steps applies to a fresh init)."})


@dataclass(frozen=True)
class FinetuneInputs:
    """The products a fine-tune builds on: the base model and the prompt set (with its dataset)."""

    base_model_version: str
    base_model_path: str
    base_model_kind: str
    base_model_parameters: int
    prompt_set_version: str
    prompt_set_path: str
    dataset_version: str
    preferences: PreferenceSetProduct | None = None  # the preference step's pairs, when any

    @classmethod
    def from_products(cls, base: BaseModelProduct, prompts: PromptSetVersion,
                      preferences: PreferenceSetProduct | None = None) -> FinetuneInputs:
        """The inputs from the base model's product, the prompt set's recorded version and the
        preference set (None: not part of this fine-tune)."""
        return cls(base_model_version=base.version, base_model_path=base.path,
                   base_model_kind=base.kind, base_model_parameters=base.parameters,
                   prompt_set_version=prompts.version, prompt_set_path=prompts.path,
                   dataset_version=prompts.dataset_version, preferences=preferences)

    def uses_preferences(self, settings: dict) -> bool:
        """Whether the fine-tune adds the preference step: enough pairs, and steps asked for."""
        return (self.preferences is not None and settings["preference_steps"] > 0
                and self.preferences.pairs >= settings["min_preference_pairs"])

    @property
    def lineage(self) -> dict[str, str]:
        """The versions a fine-tune records in its run file (and the registry from it)."""
        return {"base_model_version": self.base_model_version,
                "prompt_set_version": self.prompt_set_version,
                "dataset_version": self.dataset_version}


def settings_for_base(settings: dict, kind: str) -> dict:
    """`settings` with the ones left unset (None) chosen by the base model's kind (scratch or
    pretrained: run_config.DEFAULTS_BY_KIND)."""
    defaults = DEFAULTS_BY_KIND[kind]
    return {**settings, **{name: default for name, default in defaults.items()
                           if settings.get(name) is None}}


@dataclass(frozen=True)
class WarmStartSource:
    version: str
    adapter_path: str


def warm_start_source(production, inputs: FinetuneInputs, settings: dict) -> WarmStartSource | None:
    """The production version (a registry.ModelVersion, or None) whose adapter this fine-tune can
    start from, or None: it must have the same base model and LoRA shape, its adapter on disk, and
    other data or prompts than this one (on the same data a retrain reproduces production from a
    fresh init instead of training production further on what it has already learned)."""
    if production is None or production.base_model_version != inputs.base_model_version:
        return None
    preference_version = inputs.preferences.version if inputs.uses_preferences(settings) else None
    if (production.dataset_version, production.prompt_set_version,
            production.train_config.get("lineage", {}).get("preference_set_version")) == (
            inputs.dataset_version, inputs.prompt_set_version, preference_version):
        return None
    if any(production.train_config.get(name) != settings[name] for name in LORA_SHAPE):
        return None
    if not Path(production.adapter_path).is_dir():
        return None
    return WarmStartSource(version=production.version, adapter_path=production.adapter_path)


@dataclass(frozen=True)
class FinetunePlan:
    version: str
    steps: int
    run: RunConfig
    warm_from: WarmStartSource | None

    @property
    def output(self) -> Path:
        return Path(self.run.output_dir)

    @property
    def run_file(self) -> Path:
        return self.output / RUN_FILE

    @property
    def complete(self) -> bool:
        return (self.output / DONE_MARKER).exists()

    @property
    def zero_stage(self) -> int:
        return self.run.deepspeed_config.get("zero_optimization", {}).get("stage", 0)


def plan_finetune(settings: dict, inputs: FinetuneInputs, warm_from: WarmStartSource | None,
                  nodes: int, version_dir: Callable[[str], Path]) -> FinetunePlan:
    """The fine-tune that `settings` (every finetuned_checkpoint config value by name, the unset
    ones chosen by the base model's kind) asks for: its version (a hash of the inputs' versions,
    the hashed settings and the resolved DeepSpeed config) and its run file, in the folder
    `version_dir(version)`. Every setting that can be known wrong is checked here, before a process
    starts: a launch.TrainingConfigError or base_model.BaseModelError names it."""
    steps = settings["warm_start_steps"] if warm_from else settings["max_steps"]
    preference_steps = settings["preference_steps"] if inputs.uses_preferences(settings) else 0
    lineage = {**inputs.lineage, **({"preference_set_version": inputs.preferences.version}
                                    if preference_steps else {})}
    # num_processes is the world size, split over the trainer's nodes (a deployment setting).
    launch.check_settings(inputs.base_model_path,
                          launch.ranks_per_node(settings["num_processes"], nodes),
                          settings["target_modules"])
    overrides = launch.DeepSpeedOverrides(**{
        name: settings[name] for name in launch.DeepSpeedOverrides.__dataclass_fields__})
    deepspeed_config = launch.resolve_deepspeed_config(
        launch.load_deepspeed_config(settings["deepspeed_config"]), overrides, steps + preference_steps)
    hashed = {k: v for k, v in settings.items() if k not in UNHASHED
              and (preference_steps or k not in PREFERENCE_SETTINGS)}
    if warm_from:
        hashed.update(max_steps=steps, init_adapter_version=warm_from.version)
    version = launch.run_version({**lineage, **hashed, "deepspeed": deepspeed_config})
    prompts = Path(inputs.prompt_set_path)
    run = RunConfig(
        base_model=inputs.base_model_path,
        train_file=str(prompts / SPLIT_FILES["train"]),
        eval_file=str(prompts / SPLIT_FILES["eval"]),
        output_dir=str(version_dir(version)),
        deepspeed_config=deepspeed_config,
        # Every fine-tune setting as asked; max_steps is this run's (a warm start's own steps).
        **{f.name: settings[f.name] for f in fields(FinetuneSettings)
           if f.name not in ("max_steps", "preference_steps")},
        max_steps=steps,
        preference_steps=preference_steps,
        preference_file=(str(Path(inputs.preferences.path) / PAIRS_FILE) if preference_steps else None),
        lineage=lineage,
        init_adapter=warm_from.adapter_path if warm_from else None,
    )
    return FinetunePlan(version=version, steps=steps, run=run, warm_from=warm_from)


@dataclass(frozen=True)
class TrainingSummary:
    """What the ranks report in summary.json, and the throughput derived from it."""

    world_size: int
    global_step: int
    resumed_from_step: int
    final_loss: float
    tokens_per_s: float
    wall_seconds: float
    adapter: str
    merged: str
    eval_loss: float = math.nan
    eval_loss_base: float = math.nan
    model_tflops_per_s: float = 0.0
    mfu: float | None = None  # None without the hardware's peak

    @classmethod
    def read(cls, output: Path, parameters: int, peak_tflops: float | None) -> TrainingSummary:
        """The summary in `output`; model FLOPs are 6 x parameters a token (forward 2N, backward
        4N), the usual MFU convention; `peak_tflops` is all ranks' peak dense TFLOP/s together."""
        reported = json.loads((Path(output) / SUMMARY_FILE).read_text())
        known = {name: reported[name] for name in cls.__dataclass_fields__ if name in reported}
        achieved = 6 * parameters * reported["tokens_per_s"] / 1e12
        return cls(**{**known, "model_tflops_per_s": achieved,
                      "mfu": achieved / peak_tflops if peak_tflops else None})

    def progress_line(self) -> str:
        return (f"progress: {self.global_step} steps in {self.wall_seconds:.1f} s, "
                f"{self.tokens_per_s:.0f} tokens/s: final loss {self.final_loss:.4f}, "
                f"eval loss {self.eval_loss:.4f}")


def history(output: Path) -> list[dict]:
    return read_history(Path(output) / METRICS_FILE)


@dataclass(frozen=True)
class FinetuneRecord:
    """A finished fine-tune read back from its folder: its run file and the ranks' summary."""

    version: str
    output: Path
    run: RunConfig
    adapter_path: str
    merged_model_path: str

    @classmethod
    def read(cls, version: str, output: str | Path) -> FinetuneRecord:
        """The fine-tune `version` in `output`; a FileNotFoundError names the missing file."""
        output = Path(output)
        summary = json.loads((output / SUMMARY_FILE).read_text())
        return cls(version=version, output=output, run=RunConfig.read(output / RUN_FILE),
                   adapter_path=summary["adapter"], merged_model_path=summary["merged"])

    @property
    def run_file(self) -> Path:
        return self.output / RUN_FILE

    @property
    def checkpoint_path(self) -> str:
        return str(self.output / "deepspeed")

    @property
    def dataset_version(self) -> str:
        return self.run.lineage["dataset_version"]

    @property
    def prompt_set_version(self) -> str:
        return self.run.lineage["prompt_set_version"]

    @property
    def base_model_version(self) -> str:
        return self.run.lineage["base_model_version"]

    def train_config(self) -> dict:
        """The run file as the registry stores it."""
        return asdict(self.run)


def write_plan(finetune: FinetunePlan) -> Path:
    """Create the fine-tune's folder and write its run file there; the run file's path."""
    finetune.output.mkdir(parents=True, exist_ok=True)
    write_run_config(finetune.run, finetune.run_file)
    return finetune.run_file
