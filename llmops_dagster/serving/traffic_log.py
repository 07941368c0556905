"""The production log: every SQL statement on request_log and feedback, the two tables the serving
app writes (one row an answer, one row a rating) and the loop reads (sensors, curation, trace)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import sqlalchemy as sa


def log_requests(engine: sa.Engine, rows: list[dict]) -> None:
    """Insert a batch of answers (response id, model version, prompt, response, max_new_tokens,
    latency in ms) in one transaction: one round trip a batch, not a request."""
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO request_log (response_id, model_version, prompt, response, "
                    "max_new_tokens, latency_ms) VALUES (:id, :version, :prompt, :response, "
                    ":max_new_tokens, :latency)"), rows)


def store_feedback(engine: sa.Engine, response_id: str, client_id: str, rating: int,
                   correction: str | None, comment: str | None) -> dict:
    """Record a rating once per response and client: {feedback_id, status} where status is
    "recorded" or "already recorded"; {} when the response was never served."""
    with engine.begin() as connection:
        known = connection.execute(
            sa.text("SELECT 1 FROM request_log WHERE response_id = :id"), {"id": response_id}).scalar()
        if not known:
            return {}
        row = connection.execute(
            sa.text("INSERT INTO feedback (response_id, client_id, rating, correction, comment) "
                    "VALUES (:id, :client, :rating, :correction, :comment) "
                    "ON CONFLICT (response_id, client_id) DO NOTHING RETURNING id"),
            {"id": response_id, "client": client_id, "rating": rating, "correction": correction,
             "comment": comment}).scalar()
        if row is not None:
            return {"feedback_id": row, "status": "recorded"}
        existing = connection.execute(
            sa.text("SELECT id FROM feedback WHERE response_id = :id AND client_id = :client"),
            {"id": response_id, "client": client_id}).scalar_one()
        return {"feedback_id": existing, "status": "already recorded"}


def served_response(engine: sa.Engine, response_id: str) -> dict | None:
    """One logged answer by its response id (a UUID, any case), or None: one primary-key lookup."""
    with engine.connect() as connection:
        row = connection.execute(
            sa.text("SELECT response_id::text, model_version, prompt, response, created_at "
                    "FROM request_log WHERE response_id = CAST(:id AS uuid)"), {"id": response_id}
        ).mappings().first()
    return dict(row) if row is not None else None


def traffic_counts(engine: sa.Engine) -> dict:
    """Answers and ratings logged so far, and the newest of each (for the production_traffic asset)."""
    with engine.connect() as connection:
        row = connection.execute(sa.text(
            "SELECT (SELECT count(*) FROM request_log) AS requests, "
            "(SELECT max(created_at) FROM request_log) AS newest_request, "
            "(SELECT count(*) FROM feedback) AS ratings, "
            "(SELECT coalesce(max(id), 0) FROM feedback) AS newest_feedback_id")).mappings().one()
    return dict(row)


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


def uncurated_feedback(engine: sa.Engine, limit: int) -> pd.DataFrame:
    """Feedback not yet curated, joined with its request, oldest first.

    "Not yet curated" is an anti-join on curated_feedback's primary key, not "id above the highest
    curated id": a rating whose transaction took a lower id but committed after higher ones is
    still picked up by the next curation, exactly once."""
    with engine.connect() as connection:
        return pd.read_sql_query(
            sa.text(
                "SELECT f.id AS feedback_id, f.response_id, r.model_version, r.prompt, "
                "r.response AS answer, f.rating, f.correction FROM feedback f "
                "JOIN request_log r USING (response_id) "
                "WHERE NOT EXISTS (SELECT 1 FROM curated_feedback c WHERE c.feedback_id = f.id) "
                "ORDER BY f.id LIMIT :limit"
            ),
            connection,
            params={"limit": limit},
        )
