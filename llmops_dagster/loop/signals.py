"""What the sensors read from production: negative feedback since a cursor, recent prompts, and
live feedback rates per model version. Thresholds and decisions are plain functions."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa


@dataclass(frozen=True)
class FeedbackWindow:
    after_id: int  # the cursor: feedback ids above it are new
    last_id: int  # the highest new feedback id (= after_id when none)
    negative: int  # new negative ratings on the production model


def new_negative_feedback(engine: sa.Engine, after_id: int, model_version: str) -> FeedbackWindow:
    """Count new negative feedback on `model_version` (one indexed range scan, O(new rows))."""
    with engine.connect() as connection:
        row = connection.execute(
            sa.text("SELECT coalesce(max(f.id), :after) AS last_id, "
                    "count(*) FILTER (WHERE f.rating < 0 AND r.model_version = :version) AS negative "
                    "FROM feedback f JOIN request_log r USING (response_id) WHERE f.id > :after"),
            {"after": after_id, "version": model_version},
        ).one()
    return FeedbackWindow(after_id=after_id, last_id=int(row.last_id), negative=int(row.negative))


def recent_prompts(engine: sa.Engine, model_version: str, window: int) -> tuple[list[str], str | None]:
    """The newest `window` prompts served by `model_version`, and the newest one's time (ISO)."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT prompt, created_at FROM request_log WHERE model_version = :v "
                    "ORDER BY created_at DESC LIMIT :n"), {"v": model_version, "n": window}).all()
    return [r.prompt for r in rows], (rows[0].created_at.isoformat() if rows else None)


def reference_embeddings(engine: sa.Engine, dataset_version: str, limit: int) -> np.ndarray:
    """Up to `limit` training-prompt embeddings of a dataset version (a fixed pseudo-random sample)."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT embedding::text FROM dataset_embeddings WHERE dataset_version = :v "
                    "ORDER BY md5(row_number::text) LIMIT :n"), {"v": dataset_version, "n": limit}).all()
    return np.array([json.loads(r[0]) for r in rows], dtype=np.float32)


@dataclass(frozen=True)
class LiveRate:
    version: str
    ratings: int
    negative: int

    @property
    def negative_rate(self) -> float:
        return self.negative / self.ratings if self.ratings else 0.0


def live_rate(engine: sa.Engine, version: str) -> LiveRate:
    with engine.connect() as connection:
        row = connection.execute(
            sa.text("SELECT count(*) AS ratings, count(*) FILTER (WHERE f.rating < 0) AS negative "
                    "FROM feedback f JOIN request_log r USING (response_id) WHERE r.model_version = :v"),
            {"v": version}).one()
    return LiveRate(version=version, ratings=int(row.ratings), negative=int(row.negative))


def guard_verdict(new: LiveRate, previous: LiveRate, margin: float, min_ratings: int) -> str | None:
    """Why the new version must be rolled back, or None: its negative rate exceeds the previous
    version's by more than `margin`, over at least `min_ratings` ratings of each."""
    if new.ratings < min_ratings or previous.ratings < min_ratings:
        return None
    if new.negative_rate > previous.negative_rate + margin:
        return (f"live negative-feedback rate of {new.version} is {new.negative_rate:.1%} over "
                f"{new.ratings} ratings, above {previous.version}'s {previous.negative_rate:.1%} over "
                f"{previous.ratings} by more than the margin {margin:.1%}")
    return None
