"""Curating production feedback into training material, and reading it back as examples."""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa

from llmops_dagster.dataset.embeddings import vector_literal

FEEDBACK_SLICE = "feedback_correction"  # eval slice of examples that come from people's corrections


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


def correction_examples(engine: sa.Engine, max_rows: int | None = None) -> pd.DataFrame:
    """Reviewed corrections as training examples (prompt, response, the conversation's earlier
    turns as JSON text or None, slice) with provenance
    (feedback_id, response_id, model_version, reviewer, API key), oldest first so the order is
    deterministic; at most the newest `max_rows` (the cap per retrain).

    A correction is training material only when it came with a down-vote (one sent with an up-vote
    contradicts its rating) and a reviewer accepted it, or a key with a trusted role sent it."""
    with engine.connect() as connection:
        return pd.read_sql_query(
            sa.text("SELECT * FROM (SELECT c.feedback_id, c.response_id::text AS response_id, "
                    "c.model_version, c.prompt, c.correction AS response, r.context::text AS context, "
                    "f.reviewed_by, k.name AS api_key FROM curated_feedback c "
                    "JOIN feedback f ON f.id = c.feedback_id "
                    "LEFT JOIN request_log r ON r.response_id = c.response_id "
                    "LEFT JOIN api_keys k ON k.id = f.api_key_id "
                    "WHERE c.correction IS NOT NULL AND c.label = 'negative' "
                    "AND f.review_state = 'accepted' ORDER BY c.feedback_id DESC LIMIT :cap) newest "
                    "ORDER BY feedback_id"),
            connection, params={"cap": max_rows},
        ).assign(slice=FEEDBACK_SLICE)


def review_counts(engine: sa.Engine) -> dict[str, int]:
    """Corrections by review state: pending, accepted, rejected."""
    with engine.connect() as connection:
        rows = connection.execute(sa.text(
            "SELECT review_state, count(*) FROM feedback WHERE review_state IS NOT NULL "
            "GROUP BY review_state")).all()
    return {"pending": 0, "accepted": 0, "rejected": 0, **{state: int(n) for state, n in rows}}
