"""The bare baseline for bench_training: the same model, data and ranks in a plain DeepSpeed loop,
with no checkpoints, metrics, Pipes or resume. Started by torchrun from bench_training.py.

    torchrun --nproc_per_node=2 benchmarks/bare_deepspeed_loop.py --config run.json --out result.json
"""

import argparse
import json
import time

import deepspeed
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmops_dagster.training.examples import encode_examples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--zero-stage", type=int, default=None)
    args = parser.parse_args()
    run = json.loads(open(args.config).read())
    ds_config = run["deepspeed_config"]
    if args.zero_stage is not None:
        ds_config["zero_optimization"]["stage"] = args.zero_stage
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(run["seed"])
    tokenizer = AutoTokenizer.from_pretrained(run["base_model"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(run["base_model"]), LoraConfig(
        task_type="CAUSAL_LM", r=run["lora_r"], lora_alpha=run["lora_alpha"],
        target_modules=run["target_modules"], modules_to_save=run["modules_to_save"] or None))
    data = encode_examples(run["train_file"], tokenizer, run["seq_len"])
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    micro = ds_config["train_micro_batch_size_per_gpu"]
    n = len(data["input_ids"])
    tokens, step_seconds = 0, []
    dist.barrier()
    started = time.perf_counter()
    for step in range(run["max_steps"]):
        step_started = time.perf_counter()
        start = ((step * world + rank) * micro) % (n - micro)
        batch = {k: v[start : start + micro] for k, v in data.items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        tokens += int(batch["attention_mask"].sum())
        step_seconds.append(time.perf_counter() - step_started)
    dist.barrier()
    wall = time.perf_counter() - started
    total = torch.tensor([float(tokens)])
    dist.all_reduce(total)
    if rank == 0:
        json.dump({"tokens": float(total[0]), "wall_seconds": wall,
                   "mean_step_seconds": sum(step_seconds) / len(step_seconds)}, open(args.out, "w"))


if __name__ == "__main__":
    main()
