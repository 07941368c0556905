"""Feedback stage: people's ratings of served answers, curated into training material."""

import dagster as dg
from pydantic import Field

from llmops_dagster.feedback import curation
from llmops_dagster.serving import traffic_log
from resources.database import PostgresResource
from resources.embedder import EmbedderResource


class FeedbackTableConfig(dg.Config):
    max_rows: int = Field(default=100_000, description="Most feedback rows curated in one run.")


@dg.asset(group_name="feedback", kinds={"postgres", "pgvector"})
def feedback_table(
    context: dg.AssetExecutionContext, config: FeedbackTableConfig,
    database: PostgresResource, embedder: EmbedderResource,
) -> dg.MaterializeResult:
    """Feedback since the last curation, joined with its request, labelled and embedded (HNSW);
    corrected answers become candidate training examples for the next validated_dataset."""
    engine = database.engine()
    rows = traffic_log.uncurated_feedback(engine, config.max_rows)
    vectors = embedder.embed(rows["prompt"].tolist()) if len(rows) else []
    added = curation.store_curated(engine, rows, vectors)
    counts = curation.counts_by_rating_and_model(engine)
    corrections = curation.correction_examples(engine)
    context.log.info(f"curated {added} new feedback rows; {len(corrections)} corrections in all")
    return dg.MaterializeResult(
        metadata={
            "rows_added": added,
            "negative_added": int((rows["rating"] < 0).sum()) if len(rows) else 0,
            "rows_total": int(counts["rows"].sum()) if len(counts) else 0,
            "corrections_total": len(corrections),
            "last_feedback_id": int(rows["feedback_id"].max()) if len(rows) else "unchanged",
            "by_rating_and_model": dg.MetadataValue.md(
                counts.to_markdown(index=False) if len(counts) else "no feedback yet"),
        },
    )
