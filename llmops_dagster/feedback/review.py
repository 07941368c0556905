"""The review queue of corrections, and purging feedback, each with an append-only audit trail.

A correction sent with a down-vote waits in state 'pending' until a reviewer accepts or rejects it;
only accepted corrections become training examples. A correction from a key with a trusted role is
accepted as it arrives (the reviewer is that key). Every decision and every purge leaves a row in
feedback_audit_log with who, when and why; a purge's record keeps where the row came from (answer,
rater, time) but none of what it said, since purging is how personal data leaves the platform.

A decision is made only through the database functions review_decide_as_key (the Serve replicas,
for a live reviewer key) and review_decide_as_person (the platform's CLI, for a named person), which
write the audit row with it; neither role may update a review by itself (migration 0009).

A purge also reaches the files made from the purged rows (redaction.py): their examples are cut
from every dataset and prompt-set version that holds them, and each model version trained on them
is flagged in the registry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import pandas as pd
import sqlalchemy as sa

from llmops_dagster.feedback import redaction

DECISIONS = {"accept": "accepted", "reject": "rejected"}
KEY_ACTOR = "key:"  # how an API key's identity starts (credentials.ApiKey.identity)
INSUFFICIENT_PRIVILEGE = "42501"


class ReviewError(LookupError):
    """A review or purge that cannot be done; the message names the feedback id or filter."""


@dataclass(frozen=True)
class InitialReview:
    """The review state a rating arrives in (None: nothing to review)."""

    state: str | None
    reviewed_by: str | None = None
    note: str | None = None


def initial_review(rating: int, correction: str | None, trusted_reviewer: str | None) -> InitialReview:
    """A down-vote's correction waits for review, or is accepted at once when it comes from a
    trusted role (`trusted_reviewer`: that key's name). An up-vote's "correction" contradicts its
    rating and never becomes training data, so there is nothing to review."""
    if rating >= 0 or correction is None or not correction.strip():
        return InitialReview(None)
    if trusted_reviewer:
        return InitialReview("accepted", f"key:{trusted_reviewer}", "sent by a trusted role")
    return InitialReview("pending")


def record_initial_acceptance(connection, feedback_id: int, review: InitialReview) -> None:
    """The audit row of a correction accepted as it arrived (same transaction as its insert)."""
    if review.state == "accepted":
        connection.execute(
            sa.text("INSERT INTO feedback_audit_log (feedback_id, action, actor, reason) "
                    "VALUES (:id, 'accepted', :actor, :reason)"),
            {"id": feedback_id, "actor": review.reviewed_by, "reason": review.note})


def pending(engine: sa.Engine, limit: int = 50) -> pd.DataFrame:
    """Corrections waiting for review, with the question and the answer they correct: those whose
    rating counted (sent with a credential) first, then the rest, oldest first within each, so
    that a flood of uncredentialed corrections cannot bury the ones from known raters."""
    with engine.connect() as connection:
        return pd.read_sql_query(
            sa.text("SELECT f.id AS feedback_id, f.response_id::text AS response_id, r.model_version, "
                    "r.prompt, r.response AS answer, f.correction, f.comment, f.rater, f.counted, "
                    "f.created_at FROM feedback f JOIN request_log r USING (response_id) "
                    "WHERE f.review_state = 'pending' ORDER BY f.counted DESC, f.id LIMIT :limit"),
            connection, params={"limit": limit})


@dataclass(frozen=True)
class ReviewDecision:
    feedback_id: int
    state: str
    reviewed_by: str
    reviewed_at: datetime
    note: str


def decide(engine: sa.Engine, feedback_id: int, decision: str, actor: str, note: str = "") -> ReviewDecision:
    """Accept or reject a pending correction; the decision and its author go to the audit log."""
    if decision not in DECISIONS:
        raise ReviewError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    state = DECISIONS[decision]
    # The function checks who decides: a key's name must be a live reviewer key's; a person's is
    # any name but a key's, and only the platform's role may decide as a person.
    by_key = actor.startswith(KEY_ACTOR)
    function = "review_decide_as_key" if by_key else "review_decide_as_person"
    with engine.begin() as connection:
        try:
            decided_at = connection.execute(
                sa.text(f"SELECT {function}(:id, :state, :who, :note)"),
                {"id": feedback_id, "state": state, "note": note,
                 "who": actor.removeprefix(KEY_ACTOR) if by_key else actor}).scalar()
        except sa.exc.DBAPIError as error:
            message = str(error.orig).splitlines()[0]
            if (getattr(error.orig, "pgcode", None) == INSUFFICIENT_PRIVILEGE
                    and not message.startswith("permission denied")):
                raise ReviewError(message) from None
            raise
        if decided_at is None:
            current = connection.execute(sa.text("SELECT review_state FROM feedback WHERE id = :id"),
                                         {"id": feedback_id}).first()
            if current is None:
                raise ReviewError(f"feedback {feedback_id} does not exist (or was purged)")
            raise ReviewError(f"feedback {feedback_id} is not pending review (state: "
                              f"{current.review_state or 'no correction to review'})")
    return ReviewDecision(feedback_id, state, actor, decided_at, note)


def audit_trail(engine: sa.Engine, feedback_id: int) -> list[dict]:
    with engine.connect() as connection:
        return [dict(r) for r in connection.execute(
            sa.text("SELECT action, actor, reason, details, at FROM feedback_audit_log "
                    "WHERE feedback_id = :id ORDER BY id"), {"id": feedback_id}).mappings()]


@dataclass(frozen=True)
class PurgeFilter:
    """Which feedback rows to purge: any combination, all conditions must hold."""

    ids: tuple[int, ...] = ()
    key_name: str | None = None  # rows sent with this API key
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before
    answered_until: datetime | None = None  # ratings of answers logged before this time

    def where(self) -> tuple[str, dict]:
        clauses, params = [], {}
        if self.answered_until is not None:
            clauses.append("f.response_id IN (SELECT response_id FROM request_log "
                           "WHERE created_at < :answered_until)")
            params["answered_until"] = self.answered_until
        if self.ids:
            clauses.append("f.id = ANY(:ids)")
            params["ids"] = list(self.ids)
        if self.key_name is not None:
            clauses.append("f.api_key_id = (SELECT id FROM api_keys WHERE name = :key)")
            params["key"] = self.key_name
        if self.since is not None:
            clauses.append("f.created_at >= :since")
            params["since"] = self.since
        if self.until is not None:
            clauses.append("f.created_at < :until")
            params["until"] = self.until
        if not clauses:
            raise ReviewError("a purge needs at least one filter: ids, key, or a time range")
        return " AND ".join(clauses), params


class PurgeResult(list[int]):
    """The purged feedback ids, sorted (a list, as callers use it), with what the purge redacted
    from derived files and which model versions it flagged as trained on purged rows."""

    def __init__(self, ids=(), outcome: redaction.Outcome | None = None):
        super().__init__(ids)
        self.outcome = outcome or redaction.Outcome()

    @property
    def redactions(self) -> list[redaction.Redaction]:
        return self.outcome.redactions

    @property
    def flagged(self) -> dict[str, list[int]]:
        """model version -> the purged feedback ids it was trained on."""
        return self.outcome.flagged

    def report_lines(self) -> list[str]:
        """What the purge did beyond the rows, one line each, for a person to read."""
        return self.outcome.report_lines()


def purge(engine: sa.Engine, which: PurgeFilter, actor: str, reason: str) -> PurgeResult:
    """Delete the matching feedback rows (and their curated copies); each leaves an audit record
    with its answer id, rater, key and time, not its text. First their examples are cut from
    every artifact file that holds them and the model versions trained on them are flagged
    (redaction.redact, in this transaction: a redaction that fails leaves the rows in place, to be
    purged again)."""
    where, params = which.where()
    with engine.begin() as connection:
        ids = connection.execute(sa.text(f"SELECT f.id FROM feedback f WHERE {where} ORDER BY f.id "
                                         "FOR UPDATE"), params).scalars().all()
        if not ids:
            return PurgeResult()
        outcome = redaction.redact(connection, ids, actor=actor, reason=reason)
        rows = connection.execute(
            sa.text("DELETE FROM feedback f WHERE f.id = ANY(:ids) RETURNING f.id, f.response_id::text "
                    "AS response_id, f.rater, f.api_key_id, f.rating, f.review_state, f.created_at"),
            {"ids": list(ids)}).mappings().all()
        connection.execute(
            sa.text("INSERT INTO feedback_audit_log (feedback_id, action, actor, reason, details) "
                    "VALUES (:id, 'purged', :actor, :reason, CAST(:details AS jsonb))"),
            [{"id": r["id"], "actor": actor, "reason": reason, "details": json.dumps(
                {"response_id": r["response_id"], "rater": r["rater"], "api_key_id": r["api_key_id"],
                 "rating": r["rating"], "review_state": r["review_state"],
                 "created_at": r["created_at"].isoformat(), **outcome.details(r["id"])})}
             for r in rows])
    return PurgeResult(sorted(r["id"] for r in rows), outcome)


def expire(engine: sa.Engine, retention_days: int, now: datetime | None = None) -> PurgeResult:
    """Purge feedback older than `retention_days` (0: keep forever), as actor 'retention'."""
    if retention_days <= 0:
        return PurgeResult()
    with engine.connect() as connection:
        cutoff = connection.execute(
            sa.text("SELECT coalesce(CAST(:now AS timestamptz), now()) - make_interval(days => :days)"),
            {"now": now, "days": retention_days}).scalar_one()
    return purge(engine, PurgeFilter(until=cutoff), actor="retention",
                 reason=f"older than the {retention_days}-day retention (feedback_table.retention_days)")


def purge_answers(engine: sa.Engine, until: datetime, actor: str, reason: str) -> tuple[int, PurgeResult]:
    """Delete the answers logged before `until` (prompts and responses in request_log) and every
    rating of them (purged as `purge` does, with audit records, redactions and flags). Returns
    (answers deleted, ratings purged). A trace of a deleted answer then says it is not found."""
    ratings = purge(engine, PurgeFilter(answered_until=until), actor=actor, reason=reason)
    with engine.begin() as connection:
        answers = connection.execute(sa.text("DELETE FROM request_log WHERE created_at < :until"),
                                     {"until": until}).rowcount
    return answers, ratings


def expire_answers(engine: sa.Engine, retention_days: int) -> tuple[int, PurgeResult]:
    """purge_answers of everything older than `retention_days` (0: keep forever), as 'retention'."""
    if retention_days <= 0:
        return 0, PurgeResult()
    with engine.connect() as connection:
        cutoff = connection.execute(sa.text("SELECT now() - make_interval(days => :days)"),
                                    {"days": retention_days}).scalar_one()
    return purge_answers(engine, cutoff, actor="retention",
                         reason=f"answer older than the {retention_days}-day retention "
                                "(feedback_table.answer_retention_days)")
