"""Curating production feedback into training material, and reading it back as examples. The
statements on curated_feedback and feedback are traffic_log.py's (their owner)."""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa

from llmops_dagster.dataset.embeddings import vector_literal
from llmops_dagster.serving import traffic_log

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
    traffic_log.store_curated(engine, records)
    return len(records)


def counts_by_rating_and_model(engine: sa.Engine) -> pd.DataFrame:
    return traffic_log.curated_counts(engine)


def correction_examples(engine: sa.Engine, max_rows: int | None = None) -> pd.DataFrame:
    """Reviewed corrections as training examples (prompt, response, the conversation's earlier
    turns as JSON text or None, slice) with provenance
    (feedback_id, response_id, model_version, reviewer, API key), oldest first so the order is
    deterministic; at most the newest `max_rows` (the cap per retrain).

    A correction is training material only when it came with a down-vote (one sent with an up-vote
    contradicts its rating) and a reviewer accepted it, or a key with a trusted role sent it."""
    return traffic_log.accepted_corrections(engine, max_rows).assign(slice=FEEDBACK_SLICE)


def review_counts(engine: sa.Engine) -> dict[str, int]:
    """Corrections by review state: pending, accepted, rejected."""
    rows = traffic_log.review_state_counts(engine)
    return {"pending": 0, "accepted": 0, "rejected": 0, **{state: int(n) for state, n in rows}}
