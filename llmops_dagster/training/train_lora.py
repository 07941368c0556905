"""Fine-tune a causal LM with LoRA under DeepSpeed, one process a rank.

Stands alone; the `finetuned_checkpoint` asset starts it through Dagster Pipes, and a person can run
it by hand with a run file the asset wrote (`<output_dir>/train_config.json`):

    torchrun --nproc_per_node=2 -m llmops_dagster.training.train_lora --config run.json

The run file names the base model folder, the prompt set's train/eval JSONL files, the output
folder, the resolved DeepSpeed config and the LoRA settings. The DeepSpeed config decides ZeRO
stage, micro batch, gradient accumulation and precision; the same file runs gloo on CPUs and NCCL
on GPUs. Every `checkpoint_every` optimizer steps all ranks write a checkpoint into a staging tag
that rank 0 then marks complete and renames; a re-run continues from the newest complete one.

Products in the output folder: deepspeed/ (checkpoints), adapter/ (peft LoRA), merged/ (a Hugging
Face folder ready to serve), metrics.jsonl (one line an optimizer step), train_config.json, and
DONE (written last).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

from llmops_dagster.training.examples import BatchOrder, encode_examples, evaluate_loss, sampling_weights
from llmops_dagster.training.run_config import RunConfig, read_history

# Testing hook: a crash at an exact point, which a real fault cannot be made to produce on cue.
# "kill-at-step:N" (after optimizer step N) or "kill-during-checkpoint:N" (rank 0's shards written,
# the other ranks' maybe not, no completion marker): rank 0 SIGKILLs the whole launch.
FAULT_ENV = "LLMOPS_TRAIN_FAULT"
METRICS_EVERY = 50  # optimizer steps between reductions of per-step metrics over ranks (each a
# collective and a log event the Dagster process handles beside the ranks: every 10 cost ~4% of
# tokens/s on 2 cores, bench_training A/B)


class Reporter:
    """Logs and metrics: to Dagster through Pipes from rank 0 when launched by Dagster, else to
    stdout. Other ranks only log warnings."""

    def __init__(self, rank: int):
        self.rank = rank
        self._stack = contextlib.ExitStack()
        self.pipes = None
        logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s", stream=sys.stdout)
        self.log = logging.getLogger("train_lora")
        if rank != 0:
            self.log.setLevel(logging.WARNING)
            return
        from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

        if DAGSTER_PIPES_CONTEXT_ENV_VAR in os.environ:
            self.pipes = self._stack.enter_context(open_dagster_pipes())
            self.log = self.pipes.log

    def metric(self, payload: dict) -> None:
        if self.pipes is not None:
            self.pipes.report_custom_message(payload)

    def materialized(self, metadata: dict, data_version: str) -> None:
        if self.pipes is not None:
            self.pipes.report_asset_materialization(metadata=metadata, data_version=data_version)

    def close(self) -> None:
        self._stack.close()


def _fault() -> tuple[str, int] | None:
    value = os.environ.get(FAULT_ENV, "")
    if not value:
        return None
    kind, _, step = value.partition(":")
    return kind, int(step)


LAUNCHERS = ("llmops_dagster.training.torchrun_local", "torch.distributed.run", "torchrun",
             "deepspeed.launcher", "deepspeed/launcher")


def _kill_process_tree() -> None:
    """SIGKILL the whole launch: the outermost launcher above this rank and all it started."""
    import psutil

    me = psutil.Process()
    launchers = [p for p in me.parents() if any(m in " ".join(p.cmdline()) for m in LAUNCHERS)]
    root = launchers[-1] if launchers else me.parent()
    for process in [root, *root.children(recursive=True)]:
        if process.pid != me.pid:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)
    me.send_signal(signal.SIGKILL)


def flush_metrics(pending: list[list[float]], world: int, rank: int, attempt: str,
                  metrics_path: Path, reporter: Reporter, max_steps: int) -> None:
    """Reduce the buffered per-step metrics over ranks in one collective (mean loss, summed tokens),
    then record each step: one line in metrics.jsonl and one Pipes message."""
    import torch
    import torch.distributed as dist

    local = torch.tensor([[loss, tokens] for _, loss, tokens, _, _ in pending], dtype=torch.float64)
    dist.all_reduce(local)
    if rank != 0:
        return
    with metrics_path.open("a") as handle:
        for (step, _, _, seconds, lr), (loss_sum, tokens) in zip(pending, local.tolist(), strict=True):
            record = {"attempt": attempt, "step": int(step), "loss": loss_sum / world, "lr": lr,
                      "tokens": int(tokens), "tokens_per_s": tokens / seconds, "seconds": seconds}
            handle.write(json.dumps(record) + "\n")
            reporter.metric(record)
    reporter.log.info(f"progress: step {record['step']}/{max_steps} loss {record['loss']:.4f} "
                      f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tokens/s")


def save_checkpoint(engine, root: Path, step: int, rank: int, reporter: Reporter) -> None:
    import torch.distributed as dist

    from llmops_dagster.training import checkpoints

    engine.save_checkpoint(str(root), tag=checkpoints.staging_tag(step),
                           client_state={"global_step": step}, save_latest=False)
    if rank == 0 and _fault() == ("kill-during-checkpoint", step):
        reporter.log.warning(f"fault injection: SIGKILL while checkpoint {step} is being written")
        _kill_process_tree()
    dist.barrier()
    if rank == 0:
        checkpoints.publish(root, step, {"world_size": dist.get_world_size()})
        reporter.log.info(f"checkpoint {checkpoints.tag_for(step)} complete")
    dist.barrier()


def preference_phase(engine, config: RunConfig, tokenizer, start_step: int, rank: int,
                     reporter: Reporter, attempt: str) -> dict:
    """The preference step (preference_step.py): config.preference_steps optimizer steps of DPO on
    the pairs of config.preference_file, numbered after the supervised steps, checkpointed and
    resumed as they are; what it reached (rank 0's summary entries)."""
    import torch
    import torch.distributed as dist

    from llmops_dagster.feedback.preferences import read_pairs
    from llmops_dagster.training import preference_step as dpo

    output, world, device = Path(config.output_dir), dist.get_world_size(), engine.device
    total = config.max_steps + config.preference_steps
    pairs = read_pairs(config.preference_file)
    chosen, rejected = dpo.encode_pairs(pairs, tokenizer, config.seq_len)
    reference = dpo.reference_logps(engine, chosen, rejected, output, device)
    if rank == 0 and not (output / dpo.REFERENCE_FILE).exists():
        dpo.save_reference(*reference, output)
    dist.barrier()
    order = BatchOrder(len(pairs), config.micro_batch, world, config.seed)
    reporter.log.info(f"preference step: {config.preference_steps} DPO steps on {len(pairs)} pairs "
                      f"(beta {config.dpo_beta})")
    pending: list[list[float]] = []
    for step in range(max(start_step, config.max_steps) + 1, total + 1):
        began, losses, tokens = time.perf_counter(), [], 0
        for micro in range(config.grad_accum):
            index = order.indices((step - config.max_steps - 1) * config.grad_accum + micro, rank)
            good = {k: v[index].to(device) for k, v in chosen.items()}
            bad = {k: v[index].to(device) for k, v in rejected.items()}
            loss, _ = dpo.dpo_loss(dpo.sequence_logps(engine, good), dpo.sequence_logps(engine, bad),
                                   reference[0][index].to(device), reference[1][index].to(device),
                                   config.dpo_beta)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            tokens += int(good["attention_mask"].sum() + bad["attention_mask"].sum())
        pending.append([step, sum(losses) / len(losses), float(tokens), time.perf_counter() - began,
                        engine.get_lr()[0]])
        if step % METRICS_EVERY == 0 or step % config.checkpoint_every == 0 or step == total:
            flush_metrics(pending, world, rank, attempt, output / "metrics.jsonl", reporter, total)
            pending = []
        if step % config.checkpoint_every == 0 or step == total:
            save_checkpoint(engine, output / "deepspeed", step, rank, reporter)
    with torch.no_grad():
        everything = list(range(len(pairs)))
        _, accuracy = dpo.dpo_loss(
            dpo.sequence_logps(engine, {k: v[everything].to(device) for k, v in chosen.items()}),
            dpo.sequence_logps(engine, {k: v[everything].to(device) for k, v in rejected.items()}),
            reference[0].to(device), reference[1].to(device), config.dpo_beta)
    reporter.log.info(f"preference step done: the chosen answer preferred on {float(accuracy):.0%} "
                      f"of {len(pairs)} pairs")
    return {"preference_steps": config.preference_steps, "preference_pairs": len(pairs),
            "preference_accuracy": float(accuracy)}


def export_products(engine, config: RunConfig, tokenizer, rank: int, reporter: Reporter) -> dict:
    """Adapter and merged model from rank 0 (parameters gathered first under ZeRO-3)."""
    import deepspeed
    import torch.distributed as dist
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = Path(config.output_dir)
    stage = config.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
              if stage == 3 else contextlib.nullcontext())
    with gather:
        if rank == 0:
            engine.module.save_pretrained(str(output / "adapter"))
    dist.barrier()
    products = {}
    if rank == 0:
        base = AutoModelForCausalLM.from_pretrained(config.base_model)
        merged = PeftModel.from_pretrained(base, str(output / "adapter")).merge_and_unload()
        merged.save_pretrained(str(output / "merged"))
        tokenizer.save_pretrained(str(output / "merged"))
        products = {"adapter": str(output / "adapter"), "merged": str(output / "merged")}
        if config.eval_file:
            eval_data = encode_examples(config.eval_file, tokenizer, config.seq_len)
            products["eval_loss"] = evaluate_loss(merged, eval_data)
            products["eval_loss_base"] = evaluate_loss(
                AutoModelForCausalLM.from_pretrained(config.base_model), eval_data)
    return products


def train(config: RunConfig) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops_dagster.training import checkpoints

    deepspeed.init_distributed()  # gloo on CPUs, NCCL on GPUs: DeepSpeed's accelerator decides
    rank, world = dist.get_rank(), dist.get_world_size()
    reporter = Reporter(rank)
    output = Path(config.output_dir)
    ckpt_root = output / "deepspeed"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        removed = checkpoints.remove_partial(ckpt_root)
        if removed:
            reporter.log.warning(f"removed incomplete checkpoints left by a crash: {removed}")
    dist.barrier()

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    model = AutoModelForCausalLM.from_pretrained(config.base_model)
    model = get_peft_model(model, LoraConfig(
        task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout, target_modules=config.target_modules,
        modules_to_save=config.modules_to_save or None))
    if config.init_adapter:  # a warm start; a resumed checkpoint below overrides it anyway
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(config.init_adapter, device="cpu"))
        reporter.log.info(f"LoRA weights start from {config.init_adapter} (warm start)")
    data = encode_examples(config.train_file, tokenizer, config.seq_len)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                           config=config.deepspeed_config)
    device = engine.device

    start_step = 0
    resume = checkpoints.latest_complete(ckpt_root)
    if resume is not None:
        tag, start_step = resume
        engine.load_checkpoint(str(ckpt_root), tag=tag)
        reporter.log.info(f"resumed from checkpoint {tag} (global step {start_step})")
    weights = sampling_weights(config.train_file, config.feedback_weight)
    order = BatchOrder(len(data["input_ids"]), config.micro_batch, world, config.seed, weights)
    if len(weights) < order.n:
        reporter.log.info(f"{sum(w > 1 for w in weights)} rows from accepted corrections, each drawn "
                          f"{config.feedback_weight} times an epoch ({order.n} draws an epoch)")
    reporter.log.info(
        f"training {config.max_steps} steps on {world} ranks ({device}): micro batch "
        f"{config.micro_batch} x grad accum {config.grad_accum} x {world} ranks = "
        f"{config.micro_batch * config.grad_accum * world} examples/step, ZeRO stage "
        f"{config.deepspeed_config.get('zero_optimization', {}).get('stage', 0)}, "
        f"{sum(p.numel() for p in trainable):,} trainable parameters")

    metrics_path = output / "metrics.jsonl"
    attempt = f"{time.time():.0f}-{os.getpid()}"  # tells this attempt's records from a crashed one's
    pending: list[list[float]] = []  # this rank's metrics of steps not yet reduced over ranks
    started = time.perf_counter()
    for step in range(start_step + 1, config.max_steps + 1):
        step_started = time.perf_counter()
        losses, tokens = [], 0
        for micro in range(config.grad_accum):
            index = order.indices((step - 1) * config.grad_accum + micro, rank)
            batch = {k: v[index].to(device) for k, v in data.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            tokens += int(batch["attention_mask"].sum())
        pending.append([step, sum(losses) / len(losses), float(tokens),
                        time.perf_counter() - step_started, engine.get_lr()[0]])
        if step % METRICS_EVERY == 0 or step % config.checkpoint_every == 0 or step == config.max_steps:
            flush_metrics(pending, world, rank, attempt, metrics_path, reporter, config.max_steps)
            pending = []
        if rank == 0 and _fault() == ("kill-at-step", step):
            reporter.log.warning(f"fault injection: SIGKILL after step {step}")
            _kill_process_tree()
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            save_checkpoint(engine, ckpt_root, step, rank, reporter)

    preference = (preference_phase(engine, config, tokenizer, start_step, rank, reporter, attempt)
                  if config.preference_steps else {})
    wall = time.perf_counter() - started
    products = export_products(engine, config, tokenizer, rank, reporter)
    if rank == 0:
        history = read_history(metrics_path)
        this_run = [h for h in history if h["attempt"] == attempt] or history[-1:]
        supervised = [h for h in history if h["step"] <= config.max_steps] or history[-1:]
        summary = {
            "global_step": config.max_steps + config.preference_steps,
            "resumed_from_step": start_step,
            "final_loss": supervised[-1]["loss"],  # the supervised steps' (the preference step's below)
            **preference,
            "tokens_per_s": sum(h["tokens"] for h in this_run) / sum(h["seconds"] for h in this_run),
            "wall_seconds": wall,
            "world_size": world,
            **products,
        }
        if math.isnan(summary["final_loss"]):
            raise SystemExit("training diverged: the final loss is NaN; no product was written")
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
        (output / "DONE").write_text(json.dumps({"time": time.time()}))
        reporter.log.info(f"done: final loss {summary['final_loss']:.4f}, "
                          f"{summary['tokens_per_s']:.0f} tokens/s, {wall:.1f} s")
        reporter.materialized(
            {k: v for k, v in summary.items() if isinstance(v, int | float | str)},
            data_version=Path(config.output_dir).name,
        )
    dist.barrier()
    reporter.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="LoRA fine-tune under DeepSpeed (one rank).")
    parser.add_argument("--config", required=True, help="run file (JSON) written by the launcher")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    config = RunConfig.read(args.config)
    train(config)


if __name__ == "__main__":
    main()
