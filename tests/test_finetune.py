"""The fine-tuning stage for real: 2 DeepSpeed ranks (gloo, CPU) started by torchrun through
Dagster Pipes; SIGKILL of the process tree mid-run and mid-checkpoint, then resume."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from assets.dataset import raw_examples, validated_dataset
from assets.prompts import prompt_set
from assets.training import base_model, finetuned_checkpoint
from llmops_dagster.training import checkpoints
from llmops_dagster.training.launch import launch_command
from llmops_dagster.training.run_config import read_history
from llmops_dagster.training.train_lora import FAULT_ENV
from resources.trainer import TrainerResource

TINY_BASE = {"vocab_size": 400, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_FINETUNE = {"num_processes": 2, "max_steps": 16, "checkpoint_every": 4, "micro_batch_size": 4,
                 "seq_len": 64, "learning_rate": 0.01}


@pytest.fixture
def stage(resources, instance):
    """Data stage and base model materialized once; returns a function that runs the fine-tune."""
    all_resources = {**resources, "trainer": TrainerResource()}
    result = dg.materialize(
        [raw_examples, validated_dataset, prompt_set, base_model],
        resources=all_resources, instance=instance,
        run_config={"ops": {"raw_examples": {"config": {"synthetic_rows": 300}},
                            "base_model": {"config": TINY_BASE}}},
    )
    assert result.success

    def finetune(**overrides):
        return dg.materialize(
            [finetuned_checkpoint, prompt_set, base_model], selection=[finetuned_checkpoint],
            resources=all_resources, instance=instance, raise_on_error=False,
            run_config={"ops": {"finetuned_checkpoint": {"config": {**TINY_FINETUNE, **overrides}}}},
        )
    return finetune


def metadata(result) -> dict:
    [event] = result.asset_materializations_for_node("finetuned_checkpoint")
    return {k: v.value for k, v in event.metadata.items()}


def failure_message(result) -> str:
    [failure] = [e for e in result.all_events if e.is_step_failure]
    return failure.event_specific_data.error.message


def test_crash_mid_checkpoint_and_mid_run_then_resume(stage, resources, monkeypatch):
    # 1. SIGKILL while checkpoint 8 is being written: step 4 is the last complete one.
    monkeypatch.setenv(FAULT_ENV, "kill-during-checkpoint:8")
    crashed = stage()
    assert not crashed.success
    assert "killed by signal 9" in failure_message(crashed)
    [version_dir] = (resources["artifacts"].root_path() / "finetunes").iterdir()
    root = version_dir / "deepspeed"
    assert checkpoints.latest_complete(root) == ("step-000004", 4)
    assert not (version_dir / "DONE").exists()

    # 2. Resume, then SIGKILL after step 10: the run continued from 4 and completed 8.
    monkeypatch.setenv(FAULT_ENV, "kill-at-step:10")
    crashed = stage()
    assert not crashed.success
    assert checkpoints.latest_complete(root) == ("step-000008", 8)

    # 3. Resume without a fault: global step continues from 8 to 16.
    monkeypatch.delenv(FAULT_ENV)
    done = stage()
    assert done.success, failure_message(done)
    meta = metadata(done)
    assert meta["resumed_from_step"] == 8 and meta["global_step"] == 16
    assert meta["world_size"] == 2 and meta["zero_stage"] == 2
    assert meta["steps_reported_via_pipes"] == 8  # steps 9-16 streamed from rank 0

    history = read_history(root.parent / "metrics.jsonl")
    assert [h["step"] for h in history] == list(range(1, 17))
    first = sum(h["loss"] for h in history[:3]) / 3
    last = sum(h["loss"] for h in history[-3:]) / 3
    assert last < first - 0.2, f"training loss did not fall: {first:.3f} -> {last:.3f} (nats/token)"
    assert meta["eval_loss"] < meta["eval_loss_base_model"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(meta["merged_model_path"])
    tokenizer = AutoTokenizer.from_pretrained(meta["merged_model_path"])
    base = AutoModelForCausalLM.from_pretrained(json.loads(
        Path(meta["train_config"]).read_text())["base_model"])
    adapted = PeftModel.from_pretrained(base, meta["adapter_path"])
    ids = tokenizer("Where is my order A12345?", return_tensors="pt")["input_ids"]
    assert merged.generate(ids, max_new_tokens=5, do_sample=False).shape[1] > ids.shape[1]
    assert adapted(input_ids=ids).logits.shape == merged(input_ids=ids).logits.shape

    # 4. The same version again reuses the product: nothing is retrained or overwritten.
    again = stage()
    assert again.success and metadata(again)["steps_reported_via_pipes"] == 0


def test_bad_settings_fail_before_launch(stage):
    result = stage(target_modules=["q_proj", "c_attn"])
    assert not result.success
    assert "finetuned_checkpoint.target_modules ['c_attn'] are not modules" in failure_message(result)
    result = stage(num_processes=64)
    assert "finetuned_checkpoint.num_processes=64 but this machine has" in failure_message(result)


def test_the_same_seed_gives_the_same_adapter_bytes(stage, tmp_path):
    """Training is deterministic on one machine: a second run of the same run file (same seed,
    ranks and threads a rank) into another folder writes byte-identical adapter weights."""
    first = stage()
    assert first.success, failure_message(first)
    meta = metadata(first)
    run = json.loads(Path(meta["train_config"]).read_text())
    again = tmp_path / "again"
    again.mkdir()
    (again / "train_config.json").write_text(json.dumps({**run, "output_dir": str(again)}))
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    subprocess.run(launch_command(again / "train_config.json", int(meta["world_size"])), check=True,
                   env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=600)

    def weights(folder) -> str:
        return hashlib.sha256((Path(folder) / "adapter_model.safetensors").read_bytes()).hexdigest()

    assert weights(again / "adapter") == weights(meta["adapter_path"])
    assert read_history(again / "metrics.jsonl")[-1]["loss"] == read_history(
        Path(meta["path"]) / "metrics.jsonl")[-1]["loss"]


def test_a_warm_start_continues_from_the_production_adapter(stage, resources):
    """With production trained on other data (same base model and LoRA shape), warm_start starts
    the LoRA weights from production's adapter for warm_start_steps: a new version whose first
    step's loss is near where production ended, not where a fresh init starts. On production's
    own data it is a fresh init that reproduces production's version."""
    from llmops_dagster.governance import registry

    cold = stage()
    assert cold.success, failure_message(cold)
    production = metadata(cold)
    assert production["warm_start_from"] == "fresh LoRA init"
    engine = resources["database"].engine()
    register = {"version": production["version"], "prompt_set_version": production["prompt_set_version"],
                "base_model_version": production["base_model_version"], "checkpoint_path": "-",
                "adapter_path": production["adapter_path"],
                "merged_model_path": production["merged_model_path"],
                "train_config": json.loads(Path(production["train_config"]).read_text()),
                "eval_report_id": None}
    registry.register_candidate(engine, dataset_version=production["dataset_version"], **register)
    registry.promote(engine, production["version"], actor="test", reason="setup")

    same_data = stage(warm_start=True, warm_start_steps=4)
    assert metadata(same_data)["version"] == production["version"]  # reproduced, not trained further

    # Production as if trained on an older dataset: this run's data is new to it (lineage columns
    # are the owner's to change: the app role registers versions only through the registry).
    with sa.create_engine(os.environ["LLMOPS_DATABASE_OWNER_URL"]).begin() as connection:
        connection.execute(sa.text("UPDATE model_versions SET dataset_version = 'older' WHERE version = :v"),
                           {"v": production["version"]})
    warm = stage(warm_start=True, warm_start_steps=4)
    assert warm.success, failure_message(warm)
    continued = metadata(warm)
    assert continued["warm_start_from"] == production["version"]
    assert continued["version"] != production["version"] and continued["global_step"] == 4
    cold_history = read_history(Path(production["path"]) / "metrics.jsonl")
    warm_history = read_history(Path(continued["path"]) / "metrics.jsonl")
    assert warm_history[0]["loss"] < (cold_history[0]["loss"] + cold_history[-1]["loss"]) / 2, (
        warm_history[0], cold_history[0], cold_history[-1])
