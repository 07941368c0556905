"""Feedback stage: production traffic and people's ratings of served answers, observed as they
arrive and curated into training material; and drift of production prompts from training prompts.

The loop in the graph: serving_deployment answers -> production_traffic (request_log and feedback,
observed) -> feedback_table -> validated_dataset -> ... -> serving_deployment; production_traffic and
dataset_embeddings -> production_drift.
"""

import warnings

import dagster as dg
from pydantic import Field

from llmops_dagster.feedback import curation, review
from llmops_dagster.governance import registry
from llmops_dagster.infra.lineage import stage_definition
from llmops_dagster.loop import signals
from llmops_dagster.serving import traffic_log
from resources.database import PostgresResource
from resources.embedder import EmbedderResource
from resources.loop_settings import LoopSettings

# Observing a product that is written outside Dagster needs multi_observable_source_asset, beta in
# Dagster 1.13: its BetaWarning would come before every `llmops` command's answer.
warnings.filterwarnings("ignore", category=dg.BetaWarning,
                        message="Function `multi_observable_source_asset` is currently in beta")


@dg.multi_observable_source_asset(
    specs=[dg.AssetSpec(
        "production_traffic", **stage_definition("feedback"), kinds={"postgres"},
        description="Production traffic: every answer the served model gave (request_log) and "
        "every rating people sent (feedback), written by the serving app. Observed, not "
        "materialized (every minute by the traffic_observation sensor): its data version moves "
        "when new answers or ratings arrive.",
    )],
    required_resource_keys={"database"},
)
def production_traffic(context):
    yield traffic_observation(context.resources.database.engine())


def traffic_observation(engine) -> dg.ObserveResult:
    """production_traffic's data version and metadata: the answers and ratings logged so far."""
    counts = traffic_log.traffic_counts(engine)
    return dg.ObserveResult(
        asset_key="production_traffic",
        data_version=dg.DataVersion(f"answers-{counts['requests']}-ratings-{counts['ratings']}"),
        metadata={"answers": counts["requests"], "ratings": counts["ratings"],
                  "counted_ratings": counts["counted_ratings"],
                  "newest_answer": str(counts["newest_request"] or "-"),
                  "newest_feedback_id": counts["newest_feedback_id"]},
    )


class FeedbackTableConfig(dg.Config):
    max_rows: int = Field(default=100_000, description="Most feedback rows curated in one run.")
    retention_days: int = Field(default=365, description="Feedback older than this many days is "
                                "purged (with an audit record) before curating; 0 keeps it forever.")
    answer_retention_days: int = Field(default=365, description="Answers (prompts and responses in "
                                       "request_log) older than this many days are deleted with their "
                                       "ratings before curating; 0 keeps them forever.")


@dg.asset(**stage_definition("feedback"), deps=["production_traffic"], kinds={"postgres", "pgvector"})
def feedback_table(
    context: dg.AssetExecutionContext, config: FeedbackTableConfig,
    database: PostgresResource, embedder: EmbedderResource,
) -> dg.MaterializeResult:
    """Feedback since the last curation, joined with its request, labelled and embedded (HNSW);
    corrections a reviewer accepted become training examples for the next validated_dataset.
    Feedback past its retention is purged first."""
    engine = database.engine()
    expired = review.expire(engine, config.retention_days)
    answers_expired, ratings_expired = review.expire_answers(engine, config.answer_retention_days)
    expired += ratings_expired
    rows = traffic_log.uncurated_feedback(engine, config.max_rows)
    vectors = embedder.embed(rows["prompt"].tolist()) if len(rows) else []
    added = curation.store_curated(engine, rows, vectors)
    counts = curation.counts_by_rating_and_model(engine)
    corrections = curation.correction_examples(engine)
    reviews = curation.review_counts(engine)
    context.log.info(f"curated {added} new feedback rows; {len(corrections)} accepted corrections, "
                     f"{reviews['pending']} waiting for review; {len(expired)} expired rows purged")
    total = int(counts["rows"].sum()) if len(counts) else 0
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"curated-{total}-corrections-{len(corrections)}"),
        metadata={
            "rows_added": added,
            "negative_added": int((rows["rating"] < 0).sum()) if len(rows) else 0,
            "rows_total": int(counts["rows"].sum()) if len(counts) else 0,
            "corrections_accepted": len(corrections),
            "corrections_pending_review": reviews["pending"],
            "corrections_rejected": reviews["rejected"],
            "rows_purged_by_retention": len(expired),
            "answers_deleted_by_retention": answers_expired,
            "last_feedback_id": int(rows["feedback_id"].max()) if len(rows) else "unchanged",
            "by_rating_and_model": dg.MetadataValue.md(
                counts.to_markdown(index=False) if len(counts) else "no feedback yet"),
        },
    )


@dg.asset(**stage_definition("feedback"), deps=["production_traffic", "dataset_embeddings"],
          kinds={"pgvector"})
def production_drift(context: dg.AssetExecutionContext, database: PostgresResource,
                     embedder: EmbedderResource, loop_settings: LoopSettings) -> dg.MaterializeResult:
    """Embedding drift of the production model's newest prompts from its training prompts: the
    same test drift_sensor runs (centroid cosine distance, permutation-calibrated), on demand."""
    engine = database.engine()
    production = registry.production(engine)
    if production is None:
        raise dg.Failure("no model is in production: nothing to compare production traffic with")
    check = signals.check_production_drift(engine, embedder.embed, production,
                                           **loop_settings.drift_test())
    result = check.result
    return dg.MaterializeResult(
        data_version=dg.DataVersion(check.window_key or f"{production.version}@no-window"),
        tags={"llmops/model_version": production.version},
        metadata={
            "model_version": production.version,
            "dataset_version": production.dataset_version,
            "verdict": check.reason,
            "drifted": bool(result.drifted) if result else False,
            "statistic": round(result.statistic, 6) if result else "not tested",
            "threshold": round(result.threshold, 6) if result else "not tested",
            "p_value": round(result.p_value, 4) if result else "not tested",
            "window": loop_settings.drift_window,
        },
    )
