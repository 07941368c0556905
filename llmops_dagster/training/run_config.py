"""The run file of one fine-tune: everything the training script needs, saved beside its products,
and the per-step metrics it leaves behind."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEEPSPEED_CONFIGS_DIR = Path(__file__).resolve().parent / "deepspeed_configs"
DEFAULT_DEEPSPEED_CONFIG = "cpu_zero2"  # finetuned_checkpoint.deepspeed_config's default

# The peak learning rate is declared in the DeepSpeed file (optimizer.params.lr), as DeepSpeed
# takes it, so that a file chosen at launch (an operator's, or gpu_bf16_zero2 at 3e-4) brings the
# rate it was tuned with; the scheduler's warmup_max_lr in the file is replaced by that lr
# (launch.resolve_deepspeed_config). Help texts quote the default file's rate from it.
DEFAULT_PEAK_LR = json.loads((DEEPSPEED_CONFIGS_DIR / f"{DEFAULT_DEEPSPEED_CONFIG}.json").read_text(
))["optimizer"]["params"]["lr"]
PRETRAINED_PEAK_LR = 1e-3

# Settings a person leaves unset, by the base model's kind. The scratch model starts random: its
# output layer is trained in full, at the DeepSpeed file's high peak rate (DEFAULT_PEAK_LR). A
# pretrained model keeps its output layer, and a LoRA on it learns at a gentler PRETRAINED_PEAK_LR.
DEFAULTS_BY_KIND = {
    "scratch": {"modules_to_save": ["lm_head"], "learning_rate": None},
    "pretrained": {"modules_to_save": [], "learning_rate": PRETRAINED_PEAK_LR},
}


@dataclass(kw_only=True)
class FinetuneSettings:
    """The fine-tune's own settings, declared once: the finetuned_checkpoint asset's config and the
    training script's run file both take their defaults and descriptions from here."""

    max_steps: int = field(default=800, metadata={
        "ge": 1, "help": f"Optimizer steps. 800 at the default peak learning rate ({DEFAULT_PEAK_LR:g}) is "
        "where the default model learns to copy order numbers from the question (exact match 0.89 "
        "at 600 steps)."})
    # The ranks save when step % checkpoint_every == 0.
    checkpoint_every: int = field(default=200, metadata={
        "ge": 1, "help": "Optimizer steps between checkpoints."})
    seq_len: int = field(default=96, metadata={
        "ge": 1, "help": "Tokens per example after truncation (the start of a long prompt is dropped) and "
        "padding; the served model keeps the same prompt length."})
    lora_r: int = field(default=16, metadata={"ge": 1, "help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={
        "ge": 1, "help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={
        "ge": 0.0, "lt": 1.0, "help": "Dropout on the LoRA path."})
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS), metadata={
        "help": "Module names that get LoRA adapters."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained in full beside the adapters; unset: chosen by the base model's "
        "kind: the output layer for the scratch model (randomly initialized, its output layer must "
        "be learned), none for a pretrained one."})
    seed: int = field(default=0, metadata={"ge": 0, "help": "Seed of LoRA init and batch order."})
    # A warm-started retrain draws ~1,600 rows (200 steps x 8) from ~2,400: at weight 1 an accepted
    # correction is seen less than once and its answer does not change (measured:
    # tests/test_corrections_teach.py, README "How feedback becomes training").
    # Off by default: on the loop's warm-started retrain of the default model, 50 DPO steps at the
    # supervised schedule's learning rate cost the trusted split 0.3 token F1 (the gate refused
    # the candidate); a learning rate of its own for the step comes first.
    preference_steps: int = field(default=0, metadata={
        "ge": 0, "le": 100_000, "help": "Optimizer steps of the preference step (DPO on the "
        "preference_dataset's pairs) after the supervised steps, when the set has at least "
        "min_preference_pairs pairs; 0 (the default): never."})
    dpo_beta: float = field(default=0.1, metadata={
        "gt": 0.0, "le": 10.0, "help": "DPO's beta: how far the preference step may move from the "
        "supervised model (larger: closer to it)."})
    min_preference_pairs: int = field(default=20, metadata={
        "ge": 1, "help": "Pairs a preference set needs before a fine-tune adds the preference step."})
    feedback_weight: int = field(default=16, metadata={
        "ge": 1, "le": 1000, "help": "Times a training row made from an accepted correction is "
        "drawn an epoch, against once for a source row (a sampling weight)."})


@dataclass(kw_only=True)
class RunConfig(FinetuneSettings):
    """Everything one training run needs; saved beside its products."""

    base_model: str
    train_file: str
    output_dir: str
    deepspeed_config: dict
    eval_file: str | None = None
    # pairs.jsonl of the preference set the preference step trains on (None: no preference step;
    # preference_steps is then 0 in the run file)
    preference_file: str | None = None
    lineage: dict = field(default_factory=dict)  # dataset / prompt-set / base-model versions
    # An adapter folder (a fine-tune of the same base model, same LoRA settings) the LoRA weights
    # start from: a retrain continues where production is. None: a fresh LoRA init.
    init_adapter: str | None = None

    @classmethod
    def read(cls, path: str | Path) -> RunConfig:
        """The run file at `path` (train_config.json, as write_run_config wrote it)."""
        return cls(**json.loads(Path(path).read_text()))

    @property
    def micro_batch(self) -> int:
        return int(self.deepspeed_config["train_micro_batch_size_per_gpu"])

    @property
    def grad_accum(self) -> int:
        return int(self.deepspeed_config.get("gradient_accumulation_steps", 1))


def write_run_config(config: RunConfig, path: Path) -> None:
    path.write_text(json.dumps(asdict(config), indent=2))


def read_history(metrics_path: Path) -> list[dict]:
    """One record an optimizer step; where a crashed attempt and its resumption both logged a
    step, the later line wins."""
    by_step = {}
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]
