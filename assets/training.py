"""Fine-tuning stage: a DeepSpeed LoRA fine-tune of the base model on the prompt set."""

import dagster as dg
from pydantic import Field

from assets.base_model import SCRATCH, BaseModelConfig, base_model, upstream_base_model  # noqa: F401
from assets.preferences import preference_dataset, upstream_preferences
from assets.prompts import prompt_set
from llmops_dagster.governance import registry
from llmops_dagster.infra.instance import TRAINER_POOL
from llmops_dagster.infra.lineage import (
    REUSED,
    lineage_metadata,
    stage_definition,
    upstream_product,
    upstream_record,
)
from llmops_dagster.infra.settings import declared
from llmops_dagster.prompts import templates
from llmops_dagster.training import base_model as base_models
from llmops_dagster.training import launch, plan
from llmops_dagster.training.plots import loss_curve_markdown
from llmops_dagster.training.run_config import (
    DEFAULT_DEEPSPEED_CONFIG,
    PRETRAINED_PEAK_LR,
    FinetuneSettings,
)
from resources.artifacts import ArtifactStore
from resources.database import PostgresResource
from resources.trainer import TrainerResource


class FinetuneConfig(dg.Config):
    num_processes: int = Field(default=2, description="Ranks (CPU processes or GPUs).")
    deepspeed_config: str = Field(
        default=DEFAULT_DEEPSPEED_CONFIG, description="A file in deepspeed_configs/ (without .json), "
        "or the name of a file in LLMOPS_TRAINER_DEEPSPEED_CONFIG_DIR (the operator's folder)."
    )
    zero_stage: int | None = Field(default=None, description="Override: ZeRO stage 0-3.")
    micro_batch_size: int | None = Field(default=None, description="Override: examples a rank a micro step.")
    gradient_accumulation_steps: int | None = Field(default=None, description="Override.")
    precision: str | None = Field(default=None, description="Override: fp32, bf16 or fp16.")
    learning_rate: float | None = Field(default=None, description="Override: peak learning rate; "
                                        "unset: the DeepSpeed file's for the scratch model, "
                                        f"{PRETRAINED_PEAK_LR:g} for a pretrained one.")
    max_steps: int = declared(FinetuneSettings, "max_steps")
    checkpoint_every: int = declared(FinetuneSettings, "checkpoint_every")
    seq_len: int = declared(FinetuneSettings, "seq_len")
    lora_r: int = declared(FinetuneSettings, "lora_r")
    lora_alpha: int = declared(FinetuneSettings, "lora_alpha")
    lora_dropout: float = declared(FinetuneSettings, "lora_dropout")
    target_modules: list[str] = declared(FinetuneSettings, "target_modules")
    modules_to_save: list[str] | None = declared(FinetuneSettings, "modules_to_save")
    seed: int = declared(FinetuneSettings, "seed")
    feedback_weight: int = declared(FinetuneSettings, "feedback_weight")
    preference_steps: int = declared(FinetuneSettings, "preference_steps")
    dpo_beta: float = declared(FinetuneSettings, "dpo_beta")
    min_preference_pairs: int = declared(FinetuneSettings, "min_preference_pairs")
    warm_start: bool = declared(plan.WarmStartSettings, "warm_start")
    warm_start_steps: int = declared(plan.WarmStartSettings, "warm_start_steps")
    peak_tflops: float | None = Field(
        default=None,
        description="Peak dense TFLOP/s of all ranks together (e.g. 989 for one H200 in bf16), "
        "for model FLOPs utilization; None reports achieved TFLOP/s only.",
    )


# One fine-tune at a time on an instance: `llmops` gives this pool one slot (instance.py).
@dg.asset(**stage_definition("training"), deps=[prompt_set, base_model, preference_dataset],
          kinds={"deepspeed", "pytorch"}, pool=TRAINER_POOL)
def finetuned_checkpoint(
    context: dg.AssetExecutionContext,
    config: FinetuneConfig,
    artifacts: ArtifactStore,
    trainer: TrainerResource,
    database: PostgresResource,
) -> dg.MaterializeResult:
    """A LoRA fine-tune under DeepSpeed in N processes: checkpoints, adapter and merged model."""
    inputs = plan.FinetuneInputs.from_products(
        upstream_base_model(context), upstream_record(context, prompt_set, database.engine(),
                                                      templates.recorded_prompt_set),
        upstream_preferences(context))
    settings = plan.settings_for_base(config.model_dump(), inputs.base_model_kind)
    warm_from = (plan.warm_start_source(registry.production(database.engine()), inputs, settings)
                 if config.warm_start else None)
    if config.warm_start:
        context.log.info(f"progress: warm start from {warm_from.version}'s adapter, "
                         f"{config.warm_start_steps} steps" if warm_from else
                         "progress: no warm start (production has the same data, another base model "
                         "or LoRA shape, or there is none): a fresh LoRA init")
    try:
        finetune = plan.plan_finetune(settings, inputs, warm_from, trainer.nodes,
                                      lambda version: artifacts.version_dir("finetunes", version))
    except (launch.TrainingConfigError, base_models.BaseModelError) as error:
        raise dg.Failure(description=str(error)) from error
    reported_steps = 0
    reused = finetune.complete
    if reused:
        context.log.info(f"fine-tune {finetune.version} is complete already; reusing it")
        context.log.info(f"progress: reusing the complete fine-tune {finetune.version}: no training")
    else:
        context.log.info(f"progress: fine-tune {finetune.version}: {finetune.steps} steps on "
                         f"{config.num_processes} ranks ({trainer.nodes} node(s)) under {trainer.launcher}")
        _, messages = trainer.run(context, plan.write_plan(finetune), config.num_processes)
        reported_steps = len(messages)
    summary = plan.TrainingSummary.read(finetune.output, inputs.base_model_parameters, config.peak_tflops)
    context.log.info(summary.progress_line())
    return dg.MaterializeResult(
        data_version=dg.DataVersion(finetune.version),
        tags={"llmops/model_version": finetune.version},
        metadata=finetune_metadata(context.instance, finetune, summary, reported_steps, reused),
    )


def finetune_metadata(instance: dg.DagsterInstance, finetune: plan.FinetunePlan,
                      summary: plan.TrainingSummary, reported_steps: int, reused: bool) -> dict:
    """finetuned_checkpoint's metadata: lineage, products, the ranks' summary and the loss curve;
    `reused`: the fine-tune was complete already and this materialization trained nothing."""
    lineage = finetune.run.lineage
    output = finetune.output
    return {
        **lineage_metadata(instance, {
            "base_model": lineage["base_model_version"], "prompt_set": lineage["prompt_set_version"],
            "validated_dataset": lineage["dataset_version"],
            **({"preference_dataset": lineage["preference_set_version"]}
               if "preference_set_version" in lineage else {})}),
        "preference_steps": finetune.run.preference_steps,  # 0: no preference step
        "version": finetune.version,
        **lineage,
        "path": dg.MetadataValue.path(str(output)),
        "deepspeed_checkpoints": dg.MetadataValue.path(str(output / "deepspeed")),
        "adapter_path": dg.MetadataValue.path(summary.adapter),
        "merged_model_path": dg.MetadataValue.path(summary.merged),
        "train_config": dg.MetadataValue.path(str(finetune.run_file)),
        "world_size": summary.world_size,
        "zero_stage": finetune.zero_stage,
        "global_step": summary.global_step,
        "resumed_from_step": summary.resumed_from_step,
        "final_train_loss": round(summary.final_loss, 4),
        "eval_loss": round(summary.eval_loss, 4),
        "eval_loss_base_model": round(summary.eval_loss_base, 4),
        "tokens_per_s": round(summary.tokens_per_s, 1),
        "model_tflops_per_s": round(summary.model_tflops_per_s, 4),
        "mfu": round(summary.mfu, 4) if summary.mfu is not None else "set peak_tflops",
        "wall_seconds": round(summary.wall_seconds, 1),
        "steps_reported_via_pipes": reported_steps,
        REUSED: reused,  # True: a link to this version opens the materialization that trained it
        "warm_start_from": finetune.warm_from.version if finetune.warm_from else "fresh LoRA init",
        "loss_curve": dg.MetadataValue.md(loss_curve_markdown(plan.history(output))),
    }


def finetune_record(context: dg.AssetExecutionContext) -> plan.FinetuneRecord:
    """The fine-tune a downstream asset builds on (this run's, else Dagster's current data version
    of finetuned_checkpoint), read from its run file and summary."""
    product = upstream_product(context, finetuned_checkpoint)
    try:
        return plan.FinetuneRecord.read(product.version, product.metadata["path"])
    except FileNotFoundError as error:
        raise dg.Failure(f"finetuned_checkpoint {product.version} ({product.source}) cannot be read: "
                         f"{error}; materialize finetuned_checkpoint again") from error
