"""The fine-tune's plan and summary without launching ranks (training/plan.py): the settings by
base-model kind, the warm-start source, the version and run file, the summary's MFU, reading a
finished fine-tune back; and the eval report's contenders (evaluation/contenders.py)."""

import dataclasses
import json
from pathlib import Path

import pytest

from assets.training import FinetuneConfig
from llmops_dagster.evaluation.contenders import choose_contenders
from llmops_dagster.feedback.preferences import PreferenceSetProduct
from llmops_dagster.prompts.templates import PromptSetVersion
from llmops_dagster.training import launch, plan
from llmops_dagster.training.base_model import BaseModelProduct
from llmops_dagster.training.run_config import PRETRAINED_PEAK_LR, RunConfig


@dataclasses.dataclass
class Production:
    """The fields of registry.ModelVersion that the warm start and the champion choice read."""

    version: str = "prod"
    base_model_version: str = "base-1"
    dataset_version: str = "data-0"
    prompt_set_version: str = "prompts-0"
    adapter_path: str = ""
    merged_model_path: str = "/models/prod/merged"
    train_config: dict = dataclasses.field(default_factory=dict)


def inputs(base_path: str = "/models/base") -> plan.FinetuneInputs:
    return plan.FinetuneInputs.from_products(
        BaseModelProduct("base-1", base_path, "scratch", parameters=600_000),
        PromptSetVersion("prompts-1", "data-1", "customer_support.v1", "sha", "/prompts/1", 90, 10))


def settings(**changes) -> dict:
    return plan.settings_for_base(FinetuneConfig(**changes).model_dump(), "scratch")


def test_unset_settings_follow_the_base_models_kind():
    assert settings()["modules_to_save"] == ["lm_head"] and settings()["learning_rate"] is None
    pretrained = plan.settings_for_base(FinetuneConfig().model_dump(), "pretrained")
    assert pretrained["modules_to_save"] == [] and pretrained["learning_rate"] == PRETRAINED_PEAK_LR
    assert settings(learning_rate=0.01, modules_to_save=["embed"])["modules_to_save"] == ["embed"]


def test_warm_start_needs_new_data_the_same_shape_and_the_adapter_on_disk(tmp_path):
    shape = {name: settings()[name] for name in plan.LORA_SHAPE}
    production = Production(adapter_path=str(tmp_path), train_config=shape)
    assert plan.warm_start_source(production, inputs(), settings()) == plan.WarmStartSource(
        "prod", str(tmp_path))
    assert plan.warm_start_source(None, inputs(), settings()) is None
    same_data = dataclasses.replace(production, dataset_version="data-1", prompt_set_version="prompts-1")
    assert plan.warm_start_source(same_data, inputs(), settings()) is None
    other_base = dataclasses.replace(production, base_model_version="base-2")
    assert plan.warm_start_source(other_base, inputs(), settings()) is None
    assert plan.warm_start_source(production, inputs(), settings(lora_r=8)) is None
    gone = dataclasses.replace(production, adapter_path=str(tmp_path / "deleted"))
    assert plan.warm_start_source(gone, inputs(), settings()) is None


def test_plan_hashes_a_fresh_init_without_the_warm_start_settings(tiny_model, tmp_path):
    """A fresh init's version leaves out warm_start and warm_start_steps (a retrain on unchanged
    data reproduces production's version); a warm start hashes its steps and source."""
    base = inputs(str(tiny_model))
    fresh = plan.plan_finetune(settings(), base, None, 1, lambda v: tmp_path / v)
    asked_warm = plan.plan_finetune(settings(warm_start=True, warm_start_steps=7), base, None, 1,
                                    lambda v: tmp_path / v)
    assert fresh.version == asked_warm.version and fresh.steps == 800
    hashed = {k: v for k, v in settings().items()
              if k not in (*launch.DeepSpeedOverrides.__dataclass_fields__, "warm_start", "warm_start_steps",
                           *plan.PREFERENCE_SETTINGS)}
    assert fresh.version == launch.run_version({**base.lineage, **hashed,
                                                "deepspeed": fresh.run.deepspeed_config})
    source = plan.WarmStartSource("prod", "/adapters/prod")
    warm = plan.plan_finetune(settings(warm_start_steps=7), base, source, 1, lambda v: tmp_path / v)
    assert warm.version != fresh.version and warm.steps == warm.run.max_steps == 7
    assert warm.run.init_adapter == "/adapters/prod"
    assert warm.run.deepspeed_config["scheduler"]["params"]["total_num_steps"] == 7
    assert fresh.run.output_dir == str(tmp_path / fresh.version)
    assert (fresh.run.train_file, fresh.run.eval_file) == ("/prompts/1/train.jsonl", "/prompts/1/eval.jsonl")
    assert fresh.run.lineage == {"base_model_version": "base-1", "prompt_set_version": "prompts-1",
                                 "dataset_version": "data-1"}


def test_a_preference_step_only_with_enough_pairs(tiny_model, tmp_path):
    """Asked for (preference_steps, off by default), 20 pairs or more add the preference step: its
    steps after the supervised ones in the LR schedule, the pairs file in the run file, the
    preference set in the lineage and the version; fewer pairs, or none asked for, leave the
    fine-tune exactly as without a preference set."""
    base = inputs(str(tiny_model))
    without = plan.plan_finetune(settings(), base, None, 1, lambda v: tmp_path / v)
    few = dataclasses.replace(base, preferences=PreferenceSetProduct("pref-1", "/preferences/1", 19))
    assert plan.plan_finetune(settings(preference_steps=50), few, None, 1,
                              lambda v: tmp_path / v).version == without.version
    enough = dataclasses.replace(base, preferences=PreferenceSetProduct("pref-2", "/preferences/2", 20))
    assert plan.plan_finetune(settings(), enough, None, 1, lambda v: tmp_path / v).version == without.version
    planned = plan.plan_finetune(settings(preference_steps=50), enough, None, 1, lambda v: tmp_path / v)
    assert planned.version != without.version and planned.run.preference_steps == 50
    assert planned.run.preference_file == "/preferences/2/pairs.jsonl"
    assert planned.run.lineage["preference_set_version"] == "pref-2"
    assert planned.run.deepspeed_config["scheduler"]["params"]["total_num_steps"] == 800 + 50
    assert without.run.preference_steps == 0 and without.run.preference_file is None


def test_plan_refuses_settings_that_cannot_work(tiny_model, tmp_path):
    with pytest.raises(launch.TrainingConfigError, match="zero_stage must be 0-3"):
        plan.plan_finetune(settings(zero_stage=5), inputs(str(tiny_model)), None, 1, lambda v: tmp_path)
    with pytest.raises(launch.TrainingConfigError, match="target_modules"):
        plan.plan_finetune(settings(target_modules=["c_attn"]), inputs(str(tiny_model)), None, 1,
                           lambda v: tmp_path)


def finished(tmp_path: Path, run: RunConfig) -> Path:
    plan.write_plan(plan.FinetunePlan(version="v1", steps=run.max_steps, run=run, warm_from=None))
    (tmp_path / "summary.json").write_text(json.dumps({
        "global_step": 4, "resumed_from_step": 0, "final_loss": 1.5, "tokens_per_s": 1e6,
        "wall_seconds": 2.0, "world_size": 2, "adapter": "/a", "merged": "/m", "eval_loss": 1.7}))
    return tmp_path


def test_summary_reports_model_flops_and_mfu(tmp_path):
    run = RunConfig(base_model="/b", train_file="/t", output_dir=str(tmp_path), deepspeed_config={})
    output = finished(tmp_path, run)
    summary = plan.TrainingSummary.read(output, parameters=1_000_000, peak_tflops=12.0)
    assert summary.model_tflops_per_s == pytest.approx(6.0)  # 6 x 1e6 parameters x 1e6 tokens/s
    assert summary.mfu == pytest.approx(0.5)
    assert summary.eval_loss == 1.7 and summary.eval_loss_base != summary.eval_loss_base  # NaN: absent
    assert plan.TrainingSummary.read(output, 1_000_000, None).mfu is None


def test_a_finished_finetune_reads_back_from_its_run_file(tmp_path):
    run = RunConfig(base_model="/b", train_file="/t", output_dir=str(tmp_path), deepspeed_config={},
                    lineage={"base_model_version": "b", "prompt_set_version": "p", "dataset_version": "d"})
    record = plan.FinetuneRecord.read("v1", finished(tmp_path, run))
    assert record.run == RunConfig.read(tmp_path / "train_config.json") == run
    assert (record.dataset_version, record.prompt_set_version, record.base_model_version) == ("d", "p", "b")
    assert (record.adapter_path, record.merged_model_path) == ("/a", "/m")
    assert record.checkpoint_path == str(tmp_path / "deepspeed")
    assert record.train_config() == json.loads((tmp_path / "train_config.json").read_text())
    with pytest.raises(FileNotFoundError):
        plan.FinetuneRecord.read("v2", tmp_path / "missing")


def test_the_champion_is_production_unless_it_is_the_candidate():
    first = choose_contenders("v2", "/v2", "/base", None)
    assert first.models == {"candidate": "/v2", "base": "/base"}
    assert (first.champion_version, first.champion_label) == (None, "none (first model)")
    itself = choose_contenders("prod", "/v2", "/base", Production())
    assert "champion" not in itself.models and itself.champion_version is None
    assert itself.champion_label == "prod (the candidate itself, already in production)"
    other = choose_contenders("v2", "/v2", "/base", Production())
    assert list(other.models) == ["candidate", "base", "champion"]
    assert other.models["champion"] == "/models/prod/merged" and other.champion_version == "prod"
