"""Fine-tuning pieces without launching ranks: DeepSpeed config resolution, pre-launch checks,
checkpoint bookkeeping, batch order on resume, label masking, the scratch base model."""

import json

import pytest

from llmops_dagster.training import checkpoints, launch
from llmops_dagster.training.examples import IGNORE_INDEX, BatchOrder, encode_examples, sampling_weights


def test_overrides_and_schedule_follow_the_typed_config():
    base = launch.load_deepspeed_config("cpu_zero2")
    overrides = launch.DeepSpeedOverrides(zero_stage=3, micro_batch_size=2,
                                          gradient_accumulation_steps=4, precision="bf16",
                                          learning_rate=0.01)
    config = launch.resolve_deepspeed_config(base, overrides, max_steps=40)
    assert config["zero_optimization"]["stage"] == 3
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 4
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["scheduler"]["params"]["total_num_steps"] == 40
    assert config["scheduler"]["params"]["warmup_max_lr"] == 0.01
    assert base["zero_optimization"]["stage"] == 2  # the file's config is not mutated


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (launch.DeepSpeedOverrides(zero_stage=4), "finetuned_checkpoint.zero_stage must be 0-3"),
        (launch.DeepSpeedOverrides(precision="int4"), "finetuned_checkpoint.precision must be one of"),
        (launch.DeepSpeedOverrides(micro_batch_size=0), "finetuned_checkpoint.micro_batch_size"),
    ],
)
def test_bad_overrides_name_the_setting(overrides, message):
    with pytest.raises(launch.TrainingConfigError, match=message):
        launch.resolve_deepspeed_config(launch.load_deepspeed_config("cpu_zero2"), overrides, 10)


def test_unknown_deepspeed_config_names_the_setting():
    with pytest.raises(launch.TrainingConfigError, match="finetuned_checkpoint.deepspeed_config 'nope'"):
        launch.load_deepspeed_config("nope")


def test_pre_launch_checks_name_the_setting(tiny_model, tmp_path):
    with pytest.raises(launch.TrainingConfigError, match="num_processes=64 but this machine has"):
        launch.check_settings(str(tiny_model), 64, ["q_proj"])
    with pytest.raises(launch.TrainingConfigError,
                       match=r"target_modules \['c_attn'\] are not modules of the base model"):
        launch.check_settings(str(tiny_model), 1, ["q_proj", "c_attn"])
    with pytest.raises(ValueError, match="base model '/no/such/model' does not exist"):
        launch.check_settings("/no/such/model", 1, ["q_proj"])
    launch.check_settings(str(tiny_model), 1, ["q_proj", "v_proj"])


def test_saved_base_model_loads_through_from_pretrained(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    ids = tokenizer("where is order A10001?", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size
    assert tokenizer.decode(ids[0]) == "where is order A10001?"


def test_labels_cover_only_the_answer(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "Customer: where is order A10001?",
                                "completion": " Assistant: it ships today."}) + "\n")
    data = encode_examples(str(path), tokenizer, seq_len=48)
    labels, ids = data["labels"][0], data["input_ids"][0]
    answer = labels[labels != IGNORE_INDEX]
    assert tokenizer.decode(answer) == " Assistant: it ships today.</s>"
    assert int(data["attention_mask"][0].sum()) == int((ids != tokenizer.pad_token_id).sum())


def test_batch_order_is_the_same_after_a_resume():
    first = BatchOrder(n_examples=50, micro_batch=4, world_size=2, seed=3)
    resumed = BatchOrder(n_examples=50, micro_batch=4, world_size=2, seed=3)
    assert [first.indices(s, r) for s in range(30) for r in range(2)] == [
        resumed.indices(s, r) for s in range(30) for r in range(2)]
    epoch = sorted(i for s in range(6) for r in range(2) for i in first.indices(s, r))[:48]
    assert len(set(epoch)) == 48  # no example twice within an epoch


def test_weighted_order_draws_a_correction_its_weight_an_epoch(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"q{i}", "completion": "a", "feedback_id": 7 if i == 3 else None} for i in range(10)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    weights = sampling_weights(str(path), feedback_weight=6)
    assert weights == [1, 1, 1, 6, 1, 1, 1, 1, 1, 1]
    order = BatchOrder(n_examples=10, micro_batch=3, world_size=1, seed=1, weights=weights)
    epoch = [i for step in range(5) for i in order.indices(step, 0)]  # 15 draws: one epoch
    assert sorted(epoch) == sorted(order.pool) and epoch.count(3) == 6
    with pytest.raises(ValueError, match="weights: 9 for 10"):
        BatchOrder(n_examples=10, micro_batch=3, world_size=1, seed=1, weights=weights[:9])


def test_only_marked_checkpoints_count(tmp_path):
    assert checkpoints.latest_complete(tmp_path) is None
    for step in (4, 8):
        (tmp_path / checkpoints.staging_tag(step)).mkdir()
        checkpoints.publish(tmp_path, step, {})
    (tmp_path / checkpoints.staging_tag(12)).mkdir()  # a crash while writing step 12
    (tmp_path / checkpoints.tag_for(16)).mkdir()  # renamed but unmarked: not complete either
    assert checkpoints.latest_complete(tmp_path) == ("step-000008", 8)
    assert checkpoints.remove_partial(tmp_path) == [".staging-step-000012"]
