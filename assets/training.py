"""Fine-tuning stage: a DeepSpeed LoRA fine-tune of the base model on the prompt set."""

import json
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.base_model import SCRATCH, BaseModelConfig, base_model  # noqa: F401 (the stage's assets)
from assets.prompts import prompt_set
from llmops_dagster.governance import registry
from llmops_dagster.instance import TRAINER_POOL
from llmops_dagster.lineage import lineage_metadata, stage_definition, upstream_metadata
from llmops_dagster.prompts.templates import SPLIT_FILES
from llmops_dagster.settings import declared
from llmops_dagster.training import base_model as base_models
from llmops_dagster.training import launch
from llmops_dagster.training.plots import loss_curve_markdown
from llmops_dagster.training.run_config import (
    DEFAULTS_BY_KIND,
    FinetuneSettings,
    RunConfig,
    read_history,
    write_run_config,
)
from resources.artifacts import ArtifactStore
from resources.database import PostgresResource
from resources.trainer import TrainerResource


class FinetuneConfig(dg.Config):
    num_processes: int = Field(default=2, description="Ranks (CPU processes or GPUs).")
    deepspeed_config: str = Field(
        default="cpu_zero2", description="A file in deepspeed_configs/ (without .json), or the name "
        "of a file in LLMOPS_TRAINER_DEEPSPEED_CONFIG_DIR (the operator's folder)."
    )
    zero_stage: int | None = Field(default=None, description="Override: ZeRO stage 0-3.")
    micro_batch_size: int | None = Field(default=None, description="Override: examples a rank a micro step.")
    gradient_accumulation_steps: int | None = Field(default=None, description="Override.")
    precision: str | None = Field(default=None, description="Override: fp32, bf16 or fp16.")
    learning_rate: float | None = Field(default=None, description="Override: peak learning rate; "
                                        "unset: the DeepSpeed file's for the scratch model, 1e-3 for a "
                                        "pretrained one.")
    max_steps: int = declared(FinetuneSettings, "max_steps")
    checkpoint_every: int = declared(FinetuneSettings, "checkpoint_every")
    seq_len: int = declared(FinetuneSettings, "seq_len")
    lora_r: int = declared(FinetuneSettings, "lora_r")
    lora_alpha: int = declared(FinetuneSettings, "lora_alpha")
    lora_dropout: float = declared(FinetuneSettings, "lora_dropout")
    target_modules: list[str] = declared(FinetuneSettings, "target_modules")
    modules_to_save: list[str] | None = declared(FinetuneSettings, "modules_to_save")
    seed: int = declared(FinetuneSettings, "seed")
    warm_start: bool = Field(
        default=False,
        description="Start the LoRA weights from the production model's adapter when it has the "
        "same base model and LoRA settings (a retrain continues where production is; the loop's "
        "sensors ask for it with fewer steps) when this run has new data or prompts; otherwise a "
        "fresh init at max_steps.",
    )
    warm_start_steps: int = Field(default=200, ge=1, description="Optimizer steps of a warm start "
                                  "(max_steps applies to a fresh init).")
    peak_tflops: float | None = Field(
        default=None,
        description="Peak dense TFLOP/s of all ranks together (e.g. 989 for one H200 in bf16), "
        "for model FLOPs utilization; None reports achieved TFLOP/s only.",
    )

    def for_base(self, kind: str) -> "FinetuneConfig":
        """These settings with the ones left unset chosen by the base model's kind (scratch or
        pretrained: run_config.DEFAULTS_BY_KIND)."""
        defaults = DEFAULTS_BY_KIND[kind]
        return self.model_copy(update={
            "modules_to_save": (defaults["modules_to_save"] if self.modules_to_save is None
                                else self.modules_to_save),
            "learning_rate": (defaults["learning_rate"] if self.learning_rate is None
                              else self.learning_rate)})

    def overrides(self) -> launch.DeepSpeedOverrides:
        return launch.DeepSpeedOverrides(
            zero_stage=self.zero_stage, micro_batch_size=self.micro_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            precision=self.precision, learning_rate=self.learning_rate,
        )


LORA_SHAPE = ("lora_r", "lora_alpha", "target_modules", "modules_to_save")


def _warm_start_source(database: PostgresResource, base_version: str, prompts: dict,
                       config: FinetuneConfig):
    """The production version whose adapter this fine-tune can start from, or None: it must have
    the same base model and LoRA shape, its adapter on disk, and other data or prompts than this
    one (on the same data a retrain reproduces production from a fresh init instead of training
    production further on what it has already learned)."""
    production = registry.production(database.engine())
    if production is None or production.base_model_version != base_version:
        return None
    if (production.dataset_version, production.prompt_set_version) == (
            prompts["dataset_version"], prompts["version"]):
        return None
    if any(production.train_config.get(name) != getattr(config, name) for name in LORA_SHAPE):
        return None
    return production if Path(production.adapter_path).is_dir() else None


# One fine-tune at a time on an instance: `llmops` gives this pool one slot (instance.py).
@dg.asset(**stage_definition("training"), deps=[prompt_set, base_model], kinds={"deepspeed", "pytorch"},
          pool=TRAINER_POOL)
def finetuned_checkpoint(
    context: dg.AssetExecutionContext,
    config: FinetuneConfig,
    artifacts: ArtifactStore,
    trainer: TrainerResource,
    database: PostgresResource,
) -> dg.MaterializeResult:
    """A LoRA fine-tune under DeepSpeed in N processes: checkpoints, adapter and merged model."""
    prompts = upstream_metadata(context, prompt_set)
    base = upstream_metadata(context, base_model)
    config = config.for_base(base.get("kind", base_models.SCRATCH_KIND))
    warm_from = _warm_start_source(database, base["version"], prompts, config) if config.warm_start else None
    if config.warm_start:
        context.log.info(f"progress: warm start from {warm_from.version}'s adapter, "
                         f"{config.warm_start_steps} steps" if warm_from else
                         "progress: no warm start (production has the same data, another base model "
                         "or LoRA shape, or there is none): a fresh LoRA init")
    steps = config.warm_start_steps if warm_from else config.max_steps
    try:  # every setting that can be known wrong is checked before a process starts
        # The ranks one machine runs: num_processes is the world size, split over the trainer's nodes
        # (LLMOPS_TRAINER_NODES, a deployment setting).
        launch.check_settings(base["path"], launch.ranks_per_node(config.num_processes, trainer.nodes),
                              config.target_modules)
        deepspeed_config = launch.resolve_deepspeed_config(
            launch.load_deepspeed_config(config.deepspeed_config), config.overrides(), steps
        )
    except (launch.TrainingConfigError, base_models.BaseModelError) as error:
        raise dg.Failure(description=str(error)) from error
    lineage = {"base_model_version": base["version"], "prompt_set_version": prompts["version"],
               "dataset_version": prompts["dataset_version"]}
    # A fresh init hashes as it always did (so a retrain on unchanged data reproduces production's
    # version); a warm start adds the adapter it starts from and its own step count.
    settings = {k: v for k, v in config.model_dump().items()
                if k not in launch.DeepSpeedOverrides.__dataclass_fields__
                and k not in ("warm_start", "warm_start_steps")}
    if warm_from:
        settings.update(max_steps=steps, init_adapter_version=warm_from.version)
    version = launch.run_version({**lineage, **settings, "deepspeed": deepspeed_config})
    output = artifacts.version_dir("finetunes", version)
    run = RunConfig(
        base_model=base["path"],
        train_file=str(Path(prompts["path"]) / SPLIT_FILES["train"]),
        eval_file=str(Path(prompts["path"]) / SPLIT_FILES["eval"]),
        output_dir=str(output),
        deepspeed_config=deepspeed_config,
        target_modules=config.target_modules,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        modules_to_save=config.modules_to_save,
        max_steps=steps,
        seq_len=config.seq_len,
        checkpoint_every=config.checkpoint_every,
        seed=config.seed,
        lineage=lineage,
        init_adapter=warm_from.adapter_path if warm_from else None,
    )
    reported_steps = 0
    if (output / "DONE").exists():
        context.log.info(f"fine-tune {version} is complete already; reusing it")
        context.log.info(f"progress: reusing the complete fine-tune {version}: no training")
    else:
        output.mkdir(parents=True, exist_ok=True)
        write_run_config(run, output / "train_config.json")
        context.log.info(f"progress: fine-tune {version}: {steps} steps on {config.num_processes} "
                         f"ranks ({trainer.nodes} node(s)) under {trainer.launcher}")
        _, messages = trainer.run(context, output / "train_config.json", config.num_processes)
        reported_steps = len(messages)
    summary = json.loads((output / "summary.json").read_text())
    context.log.info(f"progress: {summary['global_step']} steps in {summary['wall_seconds']:.1f} s, "
                     f"{summary['tokens_per_s']:.0f} tokens/s: final loss {summary['final_loss']:.4f}, "
                     f"eval loss {summary.get('eval_loss', float('nan')):.4f}")
    history = read_history(output / "metrics.jsonl")
    zero_stage = deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    # Model FLOPs: 6 x parameters a token (forward 2N, backward 4N), the usual MFU convention.
    achieved_tflops = 6 * base["parameters"] * summary["tokens_per_s"] / 1e12
    mfu = achieved_tflops / config.peak_tflops if config.peak_tflops else None
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        tags={"llmops/model_version": version},
        metadata={
            **lineage_metadata(context.instance, {
                "base_model": base["version"], "prompt_set": prompts["version"],
                "validated_dataset": prompts["dataset_version"]}),
            "version": version,
            **lineage,
            "path": dg.MetadataValue.path(str(output)),
            "deepspeed_checkpoints": dg.MetadataValue.path(str(output / "deepspeed")),
            "adapter_path": dg.MetadataValue.path(summary["adapter"]),
            "merged_model_path": dg.MetadataValue.path(summary["merged"]),
            "train_config": dg.MetadataValue.path(str(output / "train_config.json")),
            "world_size": summary["world_size"],
            "zero_stage": zero_stage,
            "global_step": summary["global_step"],
            "resumed_from_step": summary["resumed_from_step"],
            "final_train_loss": round(summary["final_loss"], 4),
            "eval_loss": round(summary.get("eval_loss", float("nan")), 4),
            "eval_loss_base_model": round(summary.get("eval_loss_base", float("nan")), 4),
            "tokens_per_s": round(summary["tokens_per_s"], 1),
            "model_tflops_per_s": round(achieved_tflops, 4),
            "mfu": round(mfu, 4) if mfu is not None else "set peak_tflops",
            "wall_seconds": round(summary["wall_seconds"], 1),
            "steps_reported_via_pipes": reported_steps,
            "warm_start_from": warm_from.version if warm_from else "fresh LoRA init",
            "loss_curve": dg.MetadataValue.md(loss_curve_markdown(history)),
        },
    )
