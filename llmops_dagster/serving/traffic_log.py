"""The production log. Owns request_log, feedback, feedback_audit_log and curated_feedback: every
SQL statement on them is here. The serving app writes answers (request_log) and ratings (feedback,
with the audit row of a correction accepted as it arrives); the loop reads them (sensors, curation,
trace); review.py decides and purges through the functions below. api_keys belongs to
credentials.py; statements here only join it, read-only, for the name of a rating's key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from llmops_dagster.serving.credentials import ApiKey, RatingCredential

if TYPE_CHECKING:  # review.py calls this module for its statements
    from llmops_dagster.feedback.review import InitialReview, PurgeFilter

# The columns /v1/generate writes, by their names in the rows handed to log_requests.
_REQUEST_LOG = sa.table(
    "request_log", sa.column("response_id", sa.Uuid(as_uuid=False)), sa.column("model_version"),
    sa.column("prompt"), sa.column("context", JSONB(none_as_null=True)), sa.column("response"),
    sa.column("max_new_tokens"), sa.column("latency_ms"), sa.column("api_key_id"),
    sa.column("client_host"), sa.column("finish_reason"))
_INSERT_REQUESTS = sa.insert(_REQUEST_LOG).values(
    response_id=sa.bindparam("id"), model_version=sa.bindparam("version"),
    prompt=sa.bindparam("prompt"), context=sa.bindparam("context"),  # typed by its column
    response=sa.bindparam("response"), max_new_tokens=sa.bindparam("max_new_tokens"),
    latency_ms=sa.bindparam("latency"), api_key_id=sa.bindparam("api_key_id"),
    client_host=sa.bindparam("client_host"), finish_reason=sa.bindparam("finish_reason"))


def log_requests(engine: sa.Engine, rows: list[dict]) -> None:
    """Insert answers (response id, model version, prompt, the earlier turns of a chat request as
    a list of {role, content} or None, response, max_new_tokens, latency in ms, the asking API
    key's id or None, the asker's budget host, how the answer ended: generation.STOP, LENGTH or
    CUT_OFF, or None) in one transaction and one multi-row INSERT: one round trip, one commit.
    Other keys of a row are not logged."""
    with engine.begin() as connection:
        connection.execute(_INSERT_REQUESTS, [
            {"context": None, "client_host": None, "finish_reason": None, **row} for row in rows])


def answer_receiver(engine: sa.Engine, response_id: str) -> tuple[bool, ApiKey | None, str | None]:
    """Whether answer `response_id` was served, the API key that asked for it (None: no key) and
    the asker's budget host (None: logged before hosts were)."""
    with engine.connect() as connection:
        row = connection.execute(
            sa.text("SELECT r.api_key_id, r.client_host, k.name, k.role, k.key_prefix, k.created_by, "
                    "k.created_at, k.revoked_at, k.revoked_by FROM request_log r LEFT JOIN api_keys k "
                    "ON k.id = r.api_key_id WHERE r.response_id = CAST(:id AS uuid)"),
            {"id": response_id}).mappings().first()
    if row is None:
        return False, None, None
    if row["api_key_id"] is None:
        return True, None, row["client_host"]
    key = ApiKey(id=row["api_key_id"],
                 **{k: v for k, v in row.items() if k not in ("api_key_id", "client_host")})
    return True, key, row["client_host"]


@dataclass(frozen=True)
class Rating:
    """One rating as sent, with what its credential made of it and the review it arrives in."""

    response_id: str
    rating: int
    correction: str | None
    comment: str | None
    client_id: str  # a label the sender chose; identity comes from `credential`
    credential: RatingCredential
    review: InitialReview
    source_address: str | None


def store_feedback(engine: sa.Engine, rating: Rating) -> dict:
    """Store a rating, always; it counts once per answer and rater, and only with a credential.

    Returns {feedback_id, status, counted, reason, review}: status "counted", "duplicate" (the
    rater's earlier rating of this answer is the one that counts) or "not counted"."""
    credential = rating.credential
    values = {"id": rating.response_id, "client": rating.client_id, "rating": rating.rating,
              "correction": rating.correction, "comment": rating.comment, "rater": credential.rater,
              "actor": credential.actor,
              "credential": credential.credential, "key": credential.api_key_id,
              "address": rating.source_address, "counted": credential.counts,
              "reason": credential.reason, "review": rating.review.state,
              "reviewed_by": rating.review.reviewed_by, "note": rating.review.note}
    insert = ("INSERT INTO feedback (response_id, client_id, rating, correction, comment, rater, "
              "actor, credential, api_key_id, source_address, counted, count_reason, review_state, "
              "reviewed_by, reviewed_at, review_note) VALUES (:id, :client, :rating, :correction, "
              ":comment, :rater, :actor, :credential, :key, :address, :counted, :reason, :review, "
              ":reviewed_by, CASE WHEN :reviewed_by IS NULL THEN NULL ELSE clock_timestamp() END, :note)")
    with engine.begin() as connection:
        status = "counted" if credential.counts else "not counted"
        feedback_id = connection.execute(
            sa.text(insert + " ON CONFLICT (response_id, rater) WHERE counted DO NOTHING RETURNING id"),
            values).scalar()
        if feedback_id is None:  # this rater's rating of this answer counted already
            first = connection.execute(
                sa.text("SELECT id FROM feedback WHERE response_id = :id AND rater = :rater AND counted"),
                values).scalar_one()
            values.update(counted=False, reason=f"duplicate: {credential.rater} rated this answer "
                                                f"before (feedback {first} is the one that counts)")
            feedback_id = connection.execute(sa.text(insert + " RETURNING id"), values).scalar_one()
            status = "duplicate"
        _record_initial_acceptance(connection, feedback_id, rating.review)
    return {"feedback_id": feedback_id, "status": status, "counted": status == "counted",
            "reason": values["reason"], "review": rating.review.state}


def _record_initial_acceptance(connection: sa.Connection, feedback_id: int, review: InitialReview) -> None:
    """The audit row of a correction accepted as it arrived (same transaction as its insert)."""
    if review.state == "accepted":
        connection.execute(
            sa.text("INSERT INTO feedback_audit_log (feedback_id, action, actor, reason) "
                    "VALUES (:id, 'accepted', :actor, :reason)"),
            {"id": feedback_id, "actor": review.reviewed_by, "reason": review.note})


def served_response(engine: sa.Engine, response_id: str) -> dict | None:
    """One logged answer by its response id (a UUID, any case), or None: one primary-key lookup."""
    with engine.connect() as connection:
        row = connection.execute(
            sa.text("SELECT response_id::text, model_version, context, prompt, response, created_at "
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
            "(SELECT count(*) FROM feedback WHERE counted) AS counted_ratings, "
            "(SELECT coalesce(max(id), 0) FROM feedback) AS newest_feedback_id")).mappings().one()
    return dict(row)


@dataclass(frozen=True)
class FeedbackWindow:
    """Counted ratings committed after one database snapshot and visible in a later one."""

    since: str | None  # the cursor: a pg_snapshot; None counts from the first rating
    until: str  # the snapshot this count saw (the next cursor)
    negative: int  # counted negative ratings in the window, at most max_votes_per_actor an actor
    newest_id: int  # the highest feedback id among them (0: none)
    actors: int = 0  # distinct actors behind them
    stored: int = 0  # counted negative ratings in the window before the per-actor cap

    def reaches(self, threshold: int, min_actors: int) -> bool:
        """Whether the window asks for a retrain: `threshold` votes from `min_actors` actors."""
        return self.negative >= threshold and self.actors >= min_actors

    def summary(self, threshold: int, min_actors: int) -> str:
        """The window's figures beside the rule, for a sensor's skip reason or tags."""
        return (f"{self.negative} counted negative votes from {self.actors} actor(s) "
                f"({self.stored} stored ratings; threshold {threshold} votes from at least "
                f"{min_actors} actors)")

    @property
    def key(self) -> str:
        """The window named by where it starts (the cursor), nothing else: one decision a cursor
        position. A daemon that dies after requesting the run but before saving the cursor
        evaluates again from the same start and asks for the same key, which Dagster never
        launches twice, however many rows arrived meanwhile (they join that run's window)."""
        return hashlib.sha256(f"{self.since}".encode()).hexdigest()[:16]


def new_negative_feedback(engine: sa.Engine, since: str | None, model_version: str,
                          max_votes_per_actor: int = 3) -> FeedbackWindow:
    """Count the counted negative ratings of `model_version` not yet visible in snapshot `since`,
    by actor: each actor's ratings count at most `max_votes_per_actor` times (one key, or one host
    with any number of feedback tokens, cannot be a crowd); every rating stays stored.

    Commit-safe: a row is new exactly when its transaction (feedback.txid) was not visible in the
    cursor's snapshot, whatever id it took, so a rating committed after higher ids is counted once,
    by the next window. The snapshot and the count come from one statement, so they agree.
    Cost: an index range scan from the cursor's xmin (O(rows since the oldest open transaction))."""
    window = ("" if since is None else
              "AND f.txid >= pg_snapshot_xmin(CAST(:since AS pg_snapshot)) "
              "AND NOT pg_visible_in_snapshot(f.txid, CAST(:since AS pg_snapshot))")
    with engine.connect() as connection:
        row = connection.execute(
            sa.text("WITH by_actor AS (SELECT f.actor, count(*) AS votes, max(f.id) AS newest "
                    "FROM feedback f JOIN request_log r USING (response_id) WHERE f.counted "
                    f"AND f.rating < 0 AND r.model_version = :version {window} GROUP BY f.actor) "
                    "SELECT pg_current_snapshot()::text AS until, "
                    "coalesce(sum(least(votes, :cap)), 0) AS negative, count(*) AS actors, "
                    "coalesce(sum(votes), 0) AS stored, coalesce(max(newest), 0) AS newest_id "
                    "FROM by_actor"),
            {"since": since, "version": model_version, "cap": max_votes_per_actor}).one()
    return FeedbackWindow(since=since, until=row.until, negative=int(row.negative),
                          newest_id=int(row.newest_id), actors=int(row.actors), stored=int(row.stored))


def is_snapshot(cursor: str | None) -> bool:
    """Whether a sensor cursor is a pg_snapshot ('xmin:xmax:xip,...'); older cursors were ids."""
    return bool(cursor) and cursor.count(":") == 2


def recent_prompts(engine: sa.Engine, model_version: str, window: int) -> tuple[list[str], str | None]:
    """The newest `window` prompts served by `model_version`, and the newest one's time (ISO)."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT prompt, created_at FROM request_log WHERE model_version = :v "
                    "ORDER BY created_at DESC LIMIT :n"), {"v": model_version, "n": window}).all()
    return [r.prompt for r in rows], (rows[0].created_at.isoformat() if rows else None)


def prompts_after(engine: sa.Engine, model_version: str, after: str) -> int:
    """Prompts served by `model_version` after time `after` (ISO), counted on the (version, time) index."""
    with engine.connect() as connection:
        return int(connection.execute(
            sa.text("SELECT count(*) FROM request_log WHERE model_version = :v "
                    "AND created_at > CAST(:after AS timestamptz)"),
            {"v": model_version, "after": after}).scalar_one())


@dataclass(frozen=True)
class LiveRate:
    """Counted ratings of one version by actor (a rating without a credential never moves the
    guard): `ratings` is at most max_votes_per_actor an actor, and `negative` each actor's share
    of negative ratings times its capped count, so one actor's many votes weigh as a few."""

    version: str
    ratings: int
    negative: float
    actors: int = 0

    @property
    def negative_rate(self) -> float:
        return self.negative / self.ratings if self.ratings else 0.0


def live_rate(engine: sa.Engine, version: str, since=None, max_votes_per_actor: int = 3) -> LiveRate:
    """Counted ratings of answers `version` served at or after `since` (its promotion; None: all),
    so a version is judged on its own time in production, not on stale ratings of old answers."""
    with engine.connect() as connection:
        row = connection.execute(
            sa.text("WITH by_actor AS (SELECT f.actor, count(*) AS n, "
                    "count(*) FILTER (WHERE f.rating < 0) AS bad "
                    "FROM feedback f JOIN request_log r USING (response_id) "
                    "WHERE f.counted AND r.model_version = :v "
                    "AND (CAST(:since AS timestamptz) IS NULL OR r.created_at >= :since) "
                    "GROUP BY f.actor) "
                    "SELECT coalesce(sum(least(n, :cap)), 0) AS ratings, "
                    "coalesce(sum(bad::float8 * least(n, :cap) / n), 0) AS negative, "
                    "count(*) AS actors FROM by_actor"),
            {"v": version, "since": since, "cap": max_votes_per_actor}).one()
    return LiveRate(version=version, ratings=int(row.ratings), negative=float(row.negative),
                    actors=int(row.actors))


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


def pending_corrections(engine: sa.Engine, limit: int) -> pd.DataFrame:
    """Corrections waiting for review with the question and answer they correct: counted ratings
    first, then the rest, oldest first within each (review.pending)."""
    with engine.connect() as connection:
        return pd.read_sql_query(
            sa.text("SELECT f.id AS feedback_id, f.response_id::text AS response_id, r.model_version, "
                    "r.prompt, r.response AS answer, f.correction, f.comment, f.rater, f.counted, "
                    "f.created_at FROM feedback f JOIN request_log r USING (response_id) "
                    "WHERE f.review_state = 'pending' ORDER BY f.counted DESC, f.id LIMIT :limit"),
            connection, params={"limit": limit})


def decide_review(connection: sa.Connection, function: str, feedback_id: int, state: str, who: str,
                  note: str):
    """Call review function `function` (review_decide_as_key or review_decide_as_person, which
    writes the audit row); its decision time, None when the row is not pending."""
    if function not in ("review_decide_as_key", "review_decide_as_person"):
        raise ValueError(f"{function!r} is not a review function")
    return connection.execute(sa.text(f"SELECT {function}(:id, :state, :who, :note)"),
                              {"id": feedback_id, "state": state, "note": note, "who": who}).scalar()


def review_state(connection: sa.Connection, feedback_id: int):
    """The row (review_state) of feedback `feedback_id`, None when it does not exist."""
    return connection.execute(sa.text("SELECT review_state FROM feedback WHERE id = :id"),
                              {"id": feedback_id}).first()


def audit_trail(engine: sa.Engine, feedback_id: int) -> list[dict]:
    """The audit rows of feedback `feedback_id`, oldest first."""
    with engine.connect() as connection:
        return [dict(r) for r in connection.execute(
            sa.text("SELECT action, actor, reason, details, at FROM feedback_audit_log "
                    "WHERE feedback_id = :id ORDER BY id"), {"id": feedback_id}).mappings()]


def _purge_where(which: PurgeFilter) -> tuple[str, dict]:
    """The WHERE clause (on feedback f) and parameters of a purge filter; all conditions hold."""
    clauses, params = [], {}
    if which.answered_until is not None:
        clauses.append("f.response_id IN (SELECT response_id FROM request_log "
                       "WHERE created_at < :answered_until)")
        params["answered_until"] = which.answered_until
    if which.ids:
        clauses.append("f.id = ANY(:ids)")
        params["ids"] = list(which.ids)
    if which.key_name is not None:
        clauses.append("f.api_key_id = (SELECT id FROM api_keys WHERE name = :key)")
        params["key"] = which.key_name
    if which.since is not None:
        clauses.append("f.created_at >= :since")
        params["since"] = which.since
    if which.until is not None:
        clauses.append("f.created_at < :until")
        params["until"] = which.until
    return " AND ".join(clauses), params


def lock_for_purge(connection: sa.Connection, which: PurgeFilter) -> list[int]:
    """The ids of the feedback rows `which` matches, locked until the transaction ends."""
    where, params = _purge_where(which)
    return connection.execute(sa.text(f"SELECT f.id FROM feedback f WHERE {where} ORDER BY f.id "
                                      "FOR UPDATE"), params).scalars().all()


def delete_feedback(connection: sa.Connection, ids: list[int]) -> list:
    """Delete feedback rows; what each was (id, answer, rater, key, rating, review, time)."""
    return connection.execute(
        sa.text("DELETE FROM feedback f WHERE f.id = ANY(:ids) RETURNING f.id, f.response_id::text "
                "AS response_id, f.rater, f.api_key_id, f.rating, f.review_state, f.created_at"),
        {"ids": list(ids)}).mappings().all()


def record_purges(connection: sa.Connection, records: list[dict]) -> None:
    """The audit rows of purged feedback: {id, actor, reason, details (JSON text)} each."""
    connection.execute(
        sa.text("INSERT INTO feedback_audit_log (feedback_id, action, actor, reason, details) "
                "VALUES (:id, 'purged', :actor, :reason, CAST(:details AS jsonb))"),
        records)


def feedback_cutoff(engine: sa.Engine, retention_days: int, now=None):
    """The time `retention_days` before `now` (None: the database's now)."""
    with engine.connect() as connection:
        return connection.execute(
            sa.text("SELECT coalesce(CAST(:now AS timestamptz), now()) - make_interval(days => :days)"),
            {"now": now, "days": retention_days}).scalar_one()


def answer_cutoff(engine: sa.Engine, retention_days: int):
    """The time `retention_days` before the database's now."""
    with engine.connect() as connection:
        return connection.execute(sa.text("SELECT now() - make_interval(days => :days)"),
                                  {"days": retention_days}).scalar_one()


def delete_answers(engine: sa.Engine, until) -> int:
    """Delete the answers logged before `until`; how many."""
    with engine.begin() as connection:
        return connection.execute(sa.text("DELETE FROM request_log WHERE created_at < :until"),
                                  {"until": until}).rowcount


def missing_feedback(connection: sa.Connection, ids: list[int]) -> list[int]:
    """The ids among `ids` that no feedback row has (purged), ascending."""
    return connection.execute(sa.text(
        "SELECT i FROM unnest(CAST(:ids AS bigint[])) AS i WHERE NOT EXISTS "
        "(SELECT 1 FROM feedback f WHERE f.id = i) ORDER BY i"), {"ids": ids}).scalars().all()


def correction_reviews(engine: sa.Engine, feedback_ids: list[int]) -> dict[int, dict]:
    """feedback id -> its answer, rater, key name and review, for the rows that still exist."""
    with engine.connect() as connection:
        return {r["feedback_id"]: dict(r) for r in connection.execute(
            sa.text("SELECT f.id AS feedback_id, f.response_id::text AS response_id, f.rater, "
                    "k.name AS api_key, f.review_state, f.reviewed_by, f.reviewed_at FROM feedback f "
                    "LEFT JOIN api_keys k ON k.id = f.api_key_id WHERE f.id = ANY(:ids)"),
            {"ids": feedback_ids}).mappings()}


def store_curated(engine: sa.Engine, records: list[dict]) -> None:
    """Insert curated rows (curation.store_curated makes them); a row curated before is left alone."""
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


def curated_counts(engine: sa.Engine) -> pd.DataFrame:
    """Curated rows and corrections by model version and label."""
    with engine.connect() as connection:
        return pd.read_sql_query(
            sa.text("SELECT model_version, label, count(*) AS rows, count(correction) AS corrections "
                    "FROM curated_feedback GROUP BY model_version, label ORDER BY model_version, label"),
            connection,
        )


def accepted_corrections(engine: sa.Engine, max_rows: int | None) -> pd.DataFrame:
    """Accepted corrections of down-votes with their provenance, oldest first, at most the newest
    `max_rows` (curation.correction_examples)."""
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
        )


def rated_answers(engine: sa.Engine, limit: int) -> pd.DataFrame:
    """The newest `limit` counted ratings with their answers, oldest first (feedback_id, prompt,
    context as JSON text, answer, rating, correction, review_state, actor): preference data."""
    with engine.connect() as connection:
        return pd.read_sql_query(
            sa.text("SELECT * FROM (SELECT f.id AS feedback_id, r.prompt, r.context::text AS context, "
                    "r.response AS answer, f.rating, f.correction, f.review_state, f.actor "
                    "FROM feedback f JOIN request_log r USING (response_id) WHERE f.counted "
                    "ORDER BY f.id DESC LIMIT :limit) newest ORDER BY feedback_id"),
            connection, params={"limit": limit})


def review_state_counts(engine: sa.Engine) -> list[tuple[str, int]]:
    """(review state, corrections) for each state present."""
    with engine.connect() as connection:
        return connection.execute(sa.text(
            "SELECT review_state, count(*) FROM feedback WHERE review_state IS NOT NULL "
            "GROUP BY review_state")).all()

def complaints(engine: sa.Engine, model_version: str, limit: int) -> pd.DataFrame:
    """The newest `limit` distinct prompts (with their earlier turns) behind counted down-votes of
    answers `model_version` served, newest first: each with its down-voted answer and the accepted
    correction when one of its down-votes has one (complaints.read_examples). Per prompt, the
    newest down-vote with an accepted correction, else the newest down-vote."""
    with engine.connect() as connection:
        return pd.read_sql_query(
            sa.text("SELECT * FROM (SELECT DISTINCT ON (r.prompt, r.context::text) f.id AS feedback_id, "
                    "r.prompt, r.context::text AS context, r.response AS answer, "
                    "CASE WHEN f.review_state = 'accepted' THEN f.correction END AS correction "
                    "FROM feedback f JOIN request_log r USING (response_id) "
                    "WHERE f.counted AND f.rating < 0 AND r.model_version = :version "
                    "ORDER BY r.prompt, r.context::text, (f.review_state = 'accepted') IS TRUE DESC, "
                    "f.id DESC) newest ORDER BY feedback_id DESC LIMIT :limit"),
            connection, params={"version": model_version, "limit": limit})
