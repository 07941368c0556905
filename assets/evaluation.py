"""Evaluation stage: the candidate fine-tune against the production champion and the base model."""

import json
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.training import finetuned_checkpoint
from llmops_dagster.evaluation import scoring
from llmops_dagster.governance import registry
from llmops_dagster.lineage import (
    eval_report_version,
    lineage_metadata,
    stage_definition,
    upstream_metadata,
)
from resources.database import PostgresResource


class EvalConfig(dg.Config):
    max_examples: int = Field(default=120, description="Trusted eval records scored (the first N "
                              "without a feedback_id): the split the policy gates on.")
    max_feedback_examples: int = Field(default=200, description="Feedback-derived eval records "
                                       "scored as their own slice (the first N with a feedback_id).")
    max_new_tokens: int = Field(default=48, description="Longest generated answer (tokens).")
    batch_size: int = Field(default=16, ge=1, description="Records answered together (greedy, "
                            "left-padded: the same answers as one at a time, in a fraction of the time).")
    bootstrap_samples: int = Field(default=1000, description="Resamples of the paired bootstrap.")
    seed: int = Field(default=0, description="Seed of the bootstrap.")


def difference_text(comparison: dict | None, missing: str) -> str:
    """Candidate minus champion token F1 with its bootstrap 95% CI, or why there is none."""
    if comparison is None:
        return missing
    return (f"{comparison['mean_difference']:+.4f} "
            f"(95% CI {comparison['ci_low']:+.4f} .. {comparison['ci_high']:+.4f})")


@dg.asset(**stage_definition("evaluation"), deps=[finetuned_checkpoint], kinds={"pytorch", "postgres"})
def eval_report(
    context: dg.AssetExecutionContext, config: EvalConfig, database: PostgresResource
) -> dg.MaterializeResult:
    """Candidate vs champion vs base on the held-out split: loss, EM, token F1, slices, latency.
    The main numbers are on the trusted split; feedback-derived examples are a slice of their own."""
    candidate = upstream_metadata(context, finetuned_checkpoint)
    run = json.loads(Path(candidate["train_config"]).read_text())
    engine = database.engine()
    champion = registry.production(engine)
    models = {"candidate": candidate["merged_model_path"], "base": run["base_model"]}
    if champion is not None and champion.version != candidate["version"]:
        models["champion"] = champion.merged_model_path
    context.log.info(f"progress: scoring {', '.join(models)} on up to {config.max_examples} eval examples "
                     f"and {config.max_feedback_examples} feedback examples")
    report = scoring.evaluate(
        models, run["eval_file"], config.max_examples, config.max_new_tokens, run["seq_len"],
        config.bootstrap_samples, config.seed, config.max_feedback_examples, config.batch_size,
    )
    for role, scores in report.scores.items():
        feedback = report.feedback_scores.get(role)
        context.log.info(
            f"progress: {role}: {len(scores.per_example)} examples scored"
            + (f" + {len(feedback.per_example)} feedback" if feedback else "")
            + f", token F1 {scores.per_example['token_f1'].mean():.4f}, generation "
            f"{scores.generation_s + (feedback.generation_s if feedback else 0.0):.1f} s")
    champion_version = champion.version if "champion" in models else None
    if champion is None:
        champion_label = "none (first model)"
    elif champion_version is None:
        champion_label = f"{champion.version} (the candidate itself, already in production)"
    else:
        champion_label = champion_version
    report_id = scoring.store_report(
        engine, report, candidate["version"], champion_version,
        candidate["dataset_version"], candidate["prompt_set_version"],
    )
    metrics, slices = report.metrics(), report.slices()
    feedback_metrics = report.feedback_metrics()
    upstream = {"finetuned_checkpoint": candidate["version"],
                "base_model": candidate["base_model_version"],
                "prompt_set": candidate["prompt_set_version"],
                "validated_dataset": candidate["dataset_version"]}
    return dg.MaterializeResult(
        data_version=dg.DataVersion(eval_report_version(report_id)),
        tags={"llmops/model_version": candidate["version"]},
        metadata={
            **lineage_metadata(context.instance, upstream),
            "report_id": report_id,
            "candidate_version": candidate["version"],
            "champion_version": champion_label,
            "examples": metrics["candidate"]["examples"],
            "generation_s": dg.MetadataValue.float(round(sum(
                s.generation_s for s in [*report.scores.values(), *report.feedback_scores.values()]), 2)),
            "generation_batch_size": config.batch_size,
            "candidate_token_f1": metrics["candidate"]["token_f1"],
            "candidate_exact_match": metrics["candidate"]["exact_match"],
            # The average can hide a slice the model gets wrong: its weakest slice beside it.
            "candidate_lowest_slice": scoring.lowest_slice_text(slices.get("candidate")),
            "candidate_loss": metrics["candidate"]["loss"],
            "token_f1_vs_champion": difference_text(report.comparison, "no champion"),
            "metrics": dg.MetadataValue.md(scoring.metrics_markdown(metrics)),
            "feedback_slice_examples": report.feedback_examples(),
            "feedback_slice_token_f1": (feedback_metrics["candidate"]["token_f1"]
                                        if feedback_metrics else "no feedback examples"),
            "feedback_token_f1_vs_champion": difference_text(
                report.feedback_comparison,
                "no champion" if feedback_metrics else "no feedback examples"),
            "feedback_slice_metrics": dg.MetadataValue.md(
                scoring.metrics_markdown(feedback_metrics) if feedback_metrics
                else "No feedback-derived examples in the eval split."),
            "token_f1_per_slice": dg.MetadataValue.md(scoring.slices_markdown(slices)),
            "exact_match_per_slice": dg.MetadataValue.md(scoring.slices_markdown(slices, "exact_match")),
            "plot": dg.MetadataValue.md(scoring.slices_plot_markdown(slices)),
        },
    )
