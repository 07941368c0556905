"""Training throughput: the finetuned_checkpoint asset against a bare DeepSpeed loop on the same
model, data, ranks and steps, in one run; then ZeRO-2 against ZeRO-0 step time.

Throughput is tokens processed (non-padding, all ranks) over the training loop's wall time. Ours
includes what the asset adds inside the loop: per-step metrics all-reduced and streamed through
Dagster Pipes, and atomic checkpoints every 50 steps. Launch, model load and export are outside
both loops; the asset's whole wall time is printed beside. Goal: ratio at least 0.95.

    python benchmarks/bench_training.py [--steps 150] [--repeat 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import record

BENCH_DIR = Path(__file__).resolve().parent


def materialize_ours(steps: int, seed: int) -> tuple[dict, Path, float]:
    import dagster as dg

    from assets.dataset import raw_examples, validated_dataset
    from assets.prompts import prompt_set
    from assets.training import base_model, finetuned_checkpoint
    from llmops_dagster.definitions import defs

    started = time.perf_counter()
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [raw_examples, validated_dataset, prompt_set, base_model, finetuned_checkpoint],
            resources=defs.resources, instance=instance,
            run_config={"ops": {"finetuned_checkpoint": {"config": {"max_steps": steps, "seed": seed}}}},
        )
    wall = time.perf_counter() - started
    [event] = result.asset_materializations_for_node("finetuned_checkpoint")
    output = Path(event.metadata["path"].value)
    summary = json.loads((output / "summary.json").read_text())
    tokens = sum(json.loads(line)["tokens"] for line in (output / "metrics.jsonl").read_text().splitlines())
    return {"tokens_per_s": tokens / summary["wall_seconds"], "asset_wall_seconds": wall}, output, wall


def run_bare(run_file: Path, zero_stage: int) -> dict:
    out = run_file.parent / f"bare-zero{zero_stage}.json"
    subprocess.run(
        [sys.executable, "-m", "llmops_dagster.training.torchrun_local", "--nproc_per_node=2",
         str(BENCH_DIR / "bare_deepspeed_loop.py"), "--config", str(run_file), "--out", str(out),
         "--zero-stage", str(zero_stage)],
        check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    result = json.loads(out.read_text())
    result["tokens_per_s"] = result["tokens"] / result["wall_seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="llmops-bench-"))
    os.environ["LLMOPS_HOME"] = str(home)
    try:
        ours, bare = [], []
        for attempt in range(args.repeat):  # interleaved, so machine noise hits both alike
            measured, output, _ = materialize_ours(args.steps, seed=attempt)
            ours.append(measured)
            bare.append(run_bare(output / "train_config.json", zero_stage=2))
        zero0 = run_bare(output / "train_config.json", zero_stage=0)
    finally:
        from llmops_dagster.infra import database

        database.stop_embedded_server(home / "pg")
    best_ours = max(ours, key=lambda r: r["tokens_per_s"])
    best_bare = max(bare, key=lambda r: r["tokens_per_s"])
    zero2 = min(bare, key=lambda r: r["mean_step_seconds"])
    print(f"fine-tune throughput, 2 ranks (gloo, CPU), {args.steps} steps, best of {args.repeat}")
    print(f"  ours (asset: Pipes, metrics, checkpoints)  {best_ours['tokens_per_s']:9.0f} tokens/s "
          f"(whole asset run {best_ours['asset_wall_seconds']:.1f} s incl. data stage and launch)")
    print(f"  bare DeepSpeed loop                        {best_bare['tokens_per_s']:9.0f} tokens/s")
    ratio = best_ours['tokens_per_s'] / best_bare['tokens_per_s']
    print(f"  ratio ours/bare: {ratio:.2f} (goal: at least 0.97)")
    record("training", "fine-tune asset tokens/s / bare DeepSpeed loop", ratio, "", "at least 0.97",
           ratio >= 0.97)
    print(f"step time, bare loop: ZeRO-2 {zero2['mean_step_seconds'] * 1000:.1f} ms, "
          f"ZeRO-0 {zero0['mean_step_seconds'] * 1000:.1f} ms "
          f"(ZeRO-2/ZeRO-0 = {zero2['mean_step_seconds'] / zero0['mean_step_seconds']:.2f})")


if __name__ == "__main__":
    main()
