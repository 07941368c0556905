"""Your own model and data, end to end: a pretrained-style causal LM (a small Llama a fixture trains
briefly and saves with save_pretrained, its tokenizer carrying a chat template) fine-tuned on
chat-format records through the real chain (GX validation, DeepSpeed LoRA in 2 ranks, eval, policy
gate, Ray Serve) and asked over HTTP with a conversation; the answer traces back to the dataset.

The prompt set is rendered by the model's own chat template, the LoRA trains no module in full
(a pretrained base keeps its output layer), and the served replica renders the conversation the
way the prompt set did."""

import json
import random

import dagster as dg
import pytest
from conftest import UNLIMITED
from test_serving import post

from assets.base_model import base_model
from assets.dataset import raw_examples, validated_dataset
from assets.evaluation import eval_report
from assets.governance import approved_model
from assets.prompts import prompt_set
from assets.serving import serving_deployment
from assets.training import finetuned_checkpoint
from llmops_dagster.dataset.synthetic_data import generate_examples
from llmops_dagster.governance import trace
from llmops_dagster.prompts.templates import SPLIT_FILES, read_records
from resources.trainer import TrainerResource

SYSTEM = "You are the Aurora smart-home support assistant."
# A chat template as instruct models ship them: role markers, the assistant's turn closed by EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def conversations(n_rows: int, seed: int) -> list[dict]:
    """The synthetic support set as chat records: a system message, some earlier turns."""
    rows = generate_examples(n_rows=n_rows, seed=seed)
    chats = []
    for index, row in enumerate(rows):
        turns = [{"role": "system", "content": SYSTEM}]
        if index % 4 == 0:  # a quarter carry an earlier exchange
            earlier = rows[index - 1]
            turns += [{"role": "user", "content": earlier["prompt"]},
                      {"role": "assistant", "content": earlier["response"]}]
        turns += [{"role": "user", "content": row["prompt"]},
                  {"role": "assistant", "content": row["response"]}]
        chats.append({"messages": turns, "category": row["intent"]})
    return chats


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory):
    """A small Llama pretrained for 150 steps on the support conversations (rendered by its chat
    template), saved with save_pretrained beside its tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmops_dagster.training.base_model import train_tokenizer

    chats = conversations(600, seed=21)
    texts = [t["content"] for c in chats for t in c["messages"]] + ["<|system|> <|user|> <|assistant|>"]
    tokenizer = train_tokenizer(texts, vocab_size=800)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    encoded = [tokenizer(tokenizer.apply_chat_template(c["messages"], tokenize=False),
                         add_special_tokens=False)["input_ids"][-128:] for c in chats]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = random.Random(0)
    for _ in range(150):
        batch = generator.sample(encoded, 16)
        width = max(len(ids) for ids in batch)
        ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in batch])
        labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("pretrained")
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_a_pretrained_model_with_a_chat_template_on_chat_data_end_to_end(
        pretrained_folder, resources, instance, ray_serve, tmp_path):
    from transformers import AutoTokenizer

    source = tmp_path / "support_chats.jsonl"
    chats = conversations(480, seed=5)
    chats[7] = {"messages": [{"role": "user", "content": "Hello?"}]}  # no assistant turn
    chats[8] = {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}
    source.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")

    result = dg.materialize(
        [raw_examples, validated_dataset, base_model, prompt_set, finetuned_checkpoint, eval_report,
         approved_model, serving_deployment],
        resources={**resources, "trainer": TrainerResource(),
                   "ray_serve": ray_serve},
        instance=instance,
        run_config={"ops": {
            "raw_examples": {"config": {"source": str(source), "columns": {"slice": "category"}}},
            "base_model": {"config": {"source": str(pretrained_folder)}},
            "finetuned_checkpoint": {"config": {"max_steps": 120, "checkpoint_every": 120}},
            "eval_report": {"config": {"max_examples": 24}},
            # A model this small, briefly trained: the gate asks for a tenth of the default's F1.
            "approved_model": {"config": {"min_token_f1": 0.1, "max_loss": 6.0}},
            "serving_deployment": {"config": UNLIMITED},
        }},
    )
    assert result.success

    def metadata(asset):
        [event] = result.asset_materializations_for_node(asset.key.path[-1])
        return {k: v.value for k, v in event.metadata.items()}

    dataset = metadata(validated_dataset)
    assert dataset["rows_quarantined"] == 2 and dataset["rows_accepted"] + 2 == 480
    base = metadata(base_model)
    assert (base["kind"], base["chat_template"]) == ("pretrained", True)
    prompts = metadata(prompt_set)
    assert prompts["rendering"] == "chat_template"

    # The prompt set is the model's own chat template over each conversation.
    tokenizer = AutoTokenizer.from_pretrained(pretrained_folder)
    record = read_records(f"{prompts['path']}/{SPLIT_FILES['train']}")[0]
    turns = chats[record["source_row"] - 1]["messages"]
    assert record["prompt"] == tokenizer.apply_chat_template(turns[:-1], tokenize=False,
                                                             add_generation_prompt=True)
    assert record["completion"] == turns[-1]["content"]

    # Scratch-only defaults left out: no module trained in full, the pretrained learning rate.
    finetune = metadata(finetuned_checkpoint)
    run_file = json.loads(open(finetune["train_config"]).read())
    assert run_file["modules_to_save"] == []
    assert run_file["deepspeed_config"]["optimizer"]["params"]["lr"] == 1e-3
    assert finetune["eval_loss"] < finetune["eval_loss_base_model"]  # the fine-tune learned

    report = metadata(eval_report)
    categories = {c["category"] for c in chats if "category" in c}
    assert sum(f"| {name} " in report["token_f1_per_slice"] for name in categories) >= 5  # by category

    # Served: a conversation over HTTP, rendered as the prompt set was, logged with its turns.
    url = metadata(serving_deployment)["url"]
    conversation = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": "Where is my order A48399?"}]
    status, answer = post(f"{url}/v1/generate", {"messages": conversation}, timeout=60)
    assert status == 200 and answer["model_version"] == finetune["version"] and answer["text"]
    status, refused = post(f"{url}/v1/generate", {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"}]})
    assert status == 422 and "out of order" in json.dumps(refused)

    chain = trace.trace(resources["database"].engine(), answer["response_id"])
    assert chain["response"]["context"] == conversation[:1]
    assert chain["prompt_set"]["version"] == prompts["version"]
    assert chain["dataset"]["version"] == dataset["version"]
    assert chain["training_rows"]["count"] == dataset["rows_accepted"] - sum(
        1 for _ in read_records(f"{prompts['path']}/{SPLIT_FILES['eval']}"))
