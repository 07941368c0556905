"""Quality of the default model over seeds: the fine-tune that `make run` trains (the scratch base and
the finetuned_checkpoint asset at their defaults), once per seed, each scored on the whole eval split.

The seed sets both the base model's random initialization and the fine-tune's (LoRA init and batch
order), so the spread covers everything a retrain can vary. Printed: exact match, token F1 and eval
loss per seed, their spread (max - min), the training seconds, the lowest paired-bootstrap 95% lower
bound of token F1 between any two seeds (what the approval margin must tolerate for a retrain that
is only a different seed), and whether seed 0 trained twice (two artifact roots) gives the same
adapter bytes. Goals: EM >= 0.80 and token F1 >= 0.95 on every seed, F1 spread <= 0.03.

    python benchmarks/bench_quality.py [--seeds 0 1 2 3 4] [--no-determinism]
"""

import argparse
import hashlib
import itertools
import json
import os
import tempfile
from pathlib import Path

from results import record

SOURCE_ROWS, SOURCE_SEED = 2400, 7  # raw_examples' defaults: the synthetic set make run trains on


def train(instance, resources: dict, seed: int, steps: dict) -> dict:
    import dagster as dg

    from assets.dataset import raw_examples, validated_dataset
    from assets.prompts import prompt_set
    from assets.training import base_model, finetuned_checkpoint

    result = dg.materialize(
        [raw_examples, validated_dataset, prompt_set, base_model, finetuned_checkpoint],
        selection=[base_model, finetuned_checkpoint], resources=resources, instance=instance,
        run_config={"ops": {"base_model": {"config": {"seed": seed}},
                            "finetuned_checkpoint": {"config": {"seed": seed, **steps}}}},
    )
    [event] = result.asset_materializations_for_node("finetuned_checkpoint")
    metadata = {k: v.value for k, v in event.metadata.items()}
    config = json.loads(Path(metadata["train_config"]).read_text())
    adapter = Path(metadata["adapter_path"]) / "adapter_model.safetensors"
    return {"seed": seed, "merged": metadata["merged_model_path"], "eval_file": config["eval_file"],
            "seq_len": config["seq_len"], "train_seconds": metadata["wall_seconds"],
            "adapter_sha256": hashlib.sha256(adapter.read_bytes()).hexdigest()}


def fresh_records(eval_file: str, per_slice: int, source_rows: int, source_seed: int) -> list[dict]:
    """`per_slice` questions of every slice that the default data never holds (entities drawn anew,
    every source prompt excluded), rendered as the model's prompt set renders its records."""
    from llmops_dagster.dataset.synthetic_data import INTENTS, generate_examples
    from llmops_dagster.prompts.rendering import load_renderer, render_prompt

    renderer = load_renderer(Path(eval_file).parent)
    source = frozenset(row["prompt"] for row in generate_examples(source_rows, source_seed))
    fresh = generate_examples(per_slice * len(INTENTS), seed=source_seed + 1000, exclude=source, weights={})
    return [{"prompt": render_prompt(renderer, row["prompt"]),
             "completion": renderer.completion(row["response"]), "slice": row["intent"]} for row in fresh]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--no-determinism", action="store_true", help="skip seed 0's second run")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="fine-tune steps (default: finetuned_checkpoint's own default)")
    parser.add_argument("--fresh-per-slice", type=int, default=30,
                        help="fresh questions a slice (entities drawn anew), scored per slice")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="llmops-bench-"))
    os.environ["LLMOPS_HOME"] = str(home)

    import dagster as dg

    from assets.base_model import base_model
    from assets.dataset import raw_examples, validated_dataset
    from assets.prompts import prompt_set
    from llmops_dagster.definitions import defs
    from llmops_dagster.evaluation import scoring
    from resources.artifacts import ArtifactStore

    try:
        with dg.instance_for_test() as instance:
            resources = dict(defs.resources)
            assert dg.materialize([raw_examples, validated_dataset, base_model, prompt_set],
                                  resources=resources, instance=instance).success
            steps = {"max_steps": args.max_steps} if args.max_steps else {}
            runs = [train(instance, resources, seed, steps) for seed in args.seeds]
            again = None
            if not args.no_determinism:
                other_root = {**resources, "artifacts": ArtifactStore(root=str(home / "artifacts-2"))}
                again = train(instance, other_root, args.seeds[0], steps)
    finally:
        from llmops_dagster.infra import database

        database.stop_embedded_server(home / "pg")

    records, _ = scoring.load_eval_records(runs[0]["eval_file"], max_examples=10**9,
                                           max_feedback_examples=0)
    scores = {}
    for run in runs:
        scored = scoring.score_model(f"seed {run['seed']}", run["merged"], records, 48,
                                        run["seq_len"])
        scores[run["seed"]] = scored
        run.update(scored.summary())
    fresh = fresh_records(runs[0]["eval_file"], args.fresh_per_slice, SOURCE_ROWS, SOURCE_SEED)
    for run in runs:
        by_slice = scoring.score_model(f"seed {run['seed']} fresh", run["merged"], fresh, 48,
                                       run["seq_len"]).slices()
        run["fresh_slices"] = {name: values["exact_match"] for name, values in by_slice.items()}
        run["lowest_slice"] = min(run["fresh_slices"].items(), key=lambda item: item[1])
    f1 = [run["token_f1"] for run in runs]
    em = [run["exact_match"] for run in runs]
    lowest = min(
        ((scoring.paired_bootstrap(scores[a].per_example["token_f1"].to_numpy(),
                                   scores[b].per_example["token_f1"].to_numpy())["ci_low"], a, b)
         for a, b in itertools.permutations(scores, 2)), default=None)  # None: one seed only

    print(f"default model over seeds, {len(records)} eval examples each (the whole trusted eval split)")
    print(f"  {'seed':>4}  {'exact match':>11}  {'token F1':>8}  {'eval loss':>9}  {'train s':>7}")
    for run in runs:
        print(f"  {run['seed']:>4}  {run['exact_match']:>11.4f}  {run['token_f1']:>8.4f}  "
              f"{run['loss']:>9.4f}  {run['train_seconds']:>7.1f}")
    print(f"  exact match: min {min(em):.4f} (goal >= 0.80), spread {max(em) - min(em):.4f}")
    record("quality", "default model exact match, lowest over seeds", min(em), "", "at least 0.80",
           min(em) >= 0.80)
    record("quality", "default model token F1, lowest over seeds", min(f1), "", "at least 0.95",
           min(f1) >= 0.95)
    record("quality", "token F1 spread over seeds", max(f1) - min(f1), "", "at most 0.03",
           max(f1) - min(f1) <= 0.03)
    print(f"  token F1:    min {min(f1):.4f} (goal >= 0.95), spread {max(f1) - min(f1):.4f} "
          f"(goal <= 0.03)")
    if lowest is not None:
        print(f"  lowest bootstrap 95% lower bound of token F1, seed {lowest[1]} minus seed {lowest[2]}: "
              f"{lowest[0]:+.4f} (the approval margin must exceed {-lowest[0]:.4f})")
    slices = sorted(runs[0]["fresh_slices"])
    print(f"\nexact match per slice on {args.fresh_per_slice} fresh questions a slice (entities drawn "
          "anew, no source prompt), by seed")
    print(f"  {'slice':18}" + "".join(f"  {'seed ' + str(run['seed']):>7}" for run in runs))
    for name in slices:
        print(f"  {name:18}" + "".join(f"  {run['fresh_slices'][name]:>7.2f}" for run in runs))
    lowest_slice = min((run["lowest_slice"][1], run["lowest_slice"][0], run["seed"]) for run in runs)
    print(f"  lowest slice over seeds: {lowest_slice[1]} {lowest_slice[0]:.2f} (seed {lowest_slice[2]}; "
          "goal >= 0.80)")
    record("quality", "fresh questions: lowest slice exact match over seeds", lowest_slice[0], "",
           "at least 0.80", lowest_slice[0] >= 0.80)
    if again is not None:
        same = again["adapter_sha256"] == runs[0]["adapter_sha256"]
        print(f"  determinism: seed {args.seeds[0]} trained twice -> adapter bytes "
              f"{'identical' if same else 'DIFFER'} ({runs[0]['adapter_sha256'][:16]} vs "
              f"{again['adapter_sha256'][:16]})")


if __name__ == "__main__":
    main()
