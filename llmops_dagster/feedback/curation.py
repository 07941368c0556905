"""Curating production feedback into training material, and reading it back as examples."""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa

from llmops_dagster.dataset.embeddings import vector_literal

FEEDBACK_INTENT = "feedback_correction"  # intent of examples that come from people's corrections


def store_curated(engine: sa.Engine, rows: pd.DataFrame, vectors) -> int:
    """Insert curated rows (label from the rating); a row curated before is left alone."""
    records = [
        {"feedback_id": int(r.feedback_id), "response_id": str(r.response_id),
         "model_version": r.model_version, "prompt": r.prompt, "answer": r.answer,
         "label": "positive" if r.rating > 0 else "negative",
         "correction": r.correction if isinstance(r.correction, str) and r.correction.strip() else None,
         "embedding": vector_literal(vector)}
        for r, vector in zip(rows.itertuples(index=False), vectors, strict=True)
    ]
    if not records:
        return 0
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO curated_feedback (feedback_id, response_id, model_version, prompt, answer, "
                "label, correction, embedding) VALUES (:feedback_id, :response_id, :model_version, "
                ":prompt, :answer, :label, :correction, CAST(:embedding AS vector)) "
                "ON CONFLICT (feedback_id) DO NOTHING"
            ),
            records,
        )
    return len(records)


def counts_by_rating_and_model(engine: sa.Engine) -> pd.DataFrame:
    with engine.connect() as connection:
        return pd.read_sql_query(
            sa.text("SELECT model_version, label, count(*) AS rows, count(correction) AS corrections "
                    "FROM curated_feedback GROUP BY model_version, label ORDER BY model_version, label"),
            connection,
        )


def correction_examples(engine: sa.Engine) -> pd.DataFrame:
    """Every correction given with a down-vote as a training example (prompt, response, intent)
    with provenance (feedback_id, response_id, model_version), oldest first, so the order is
    deterministic. A "correction" sent with an up-vote contradicts its rating and is kept out."""
    with engine.connect() as connection:
        return pd.read_sql_query(
            sa.text("SELECT feedback_id, response_id::text AS response_id, model_version, prompt, "
                    "correction AS response FROM curated_feedback "
                    "WHERE correction IS NOT NULL AND label = 'negative' "
                    "ORDER BY feedback_id"),
            connection,
        ).assign(intent=FEEDBACK_INTENT)
