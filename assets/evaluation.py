"""Evaluation stage: the candidate fine-tune against the production champion and the base model."""

import dagster as dg

from assets.training import finetune_record, finetuned_checkpoint
from llmops_dagster.evaluation import complaints, scoring
from llmops_dagster.evaluation.contenders import Contenders, choose_contenders
from llmops_dagster.governance import registry
from llmops_dagster.infra.lineage import eval_report_version, lineage_metadata, stage_definition
from llmops_dagster.infra.settings import declared
from llmops_dagster.training.plan import FinetuneRecord
from resources.database import PostgresResource

EvalSettings = scoring.EvalSettings


class EvalConfig(dg.Config):
    max_examples: int = declared(EvalSettings, "max_examples")
    max_feedback_examples: int = declared(EvalSettings, "max_feedback_examples")
    max_complaint_examples: int = declared(EvalSettings, "max_complaint_examples")
    max_new_tokens: int = declared(EvalSettings, "max_new_tokens")
    batch_size: int = declared(EvalSettings, "batch_size")
    bootstrap_samples: int = declared(EvalSettings, "bootstrap_samples")
    seed: int = declared(EvalSettings, "seed")


@dg.asset(**stage_definition("evaluation"), deps=[finetuned_checkpoint], kinds={"pytorch", "postgres"})
def eval_report(
    context: dg.AssetExecutionContext, config: EvalConfig, database: PostgresResource
) -> dg.MaterializeResult:
    """Candidate vs champion vs base on the held-out split: loss, EM, token F1, slices, latency.
    The main numbers are on the trusted split; feedback-derived examples are a slice of their own,
    and so are the production model's down-voted answers (the complaint slice)."""
    candidate = finetune_record(context)
    engine = database.engine()
    production = registry.production(engine)
    contenders = choose_contenders(candidate.version, candidate.merged_model_path,
                                   candidate.run.base_model, production)
    complained = complaints.read_examples(engine, production, candidate, config.max_complaint_examples)
    context.log.info(f"progress: scoring {', '.join(contenders.models)} on up to {config.max_examples} "
                     f"eval examples, {config.max_feedback_examples} feedback examples and "
                     f"{len(complained.examples)} complaint examples")
    report = scoring.evaluate(
        contenders.models, candidate.run.eval_file, config.max_examples, config.max_new_tokens,
        candidate.run.seq_len, config.bootstrap_samples, config.seed, config.max_feedback_examples,
        config.batch_size, complaints=complained,
    )
    for line in report.progress_lines():
        context.log.info(line)
    report_id = scoring.store_report(engine, report, candidate.version, contenders.champion_version,
                                     candidate.dataset_version, candidate.prompt_set_version)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(eval_report_version(report_id)),
        tags={"llmops/model_version": candidate.version},
        metadata=report_metadata(context.instance, config, candidate, contenders, report, report_id),
    )


def report_metadata(instance: dg.DagsterInstance, config: EvalConfig, candidate: FinetuneRecord,
                    contenders: Contenders, report: scoring.EvalReport, report_id: int) -> dict:
    """eval_report's metadata: lineage, the candidate's headline numbers, tables and a plot."""
    upstream = {"finetuned_checkpoint": candidate.version,
                "base_model": candidate.base_model_version,
                "prompt_set": candidate.prompt_set_version,
                "validated_dataset": candidate.dataset_version}
    summary = scoring.report_summary(report, config.batch_size)
    summary["generation_s"] = dg.MetadataValue.float(summary["generation_s"])
    for entry in scoring.MARKDOWN_ENTRIES:
        summary[entry] = dg.MetadataValue.md(summary[entry])
    return {
        **lineage_metadata(instance, upstream),
        "report_id": report_id,
        "candidate_version": candidate.version,
        "champion_version": contenders.champion_label,
        **summary,
    }
