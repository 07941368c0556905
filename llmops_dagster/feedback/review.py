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

The statements on feedback, request_log and feedback_audit_log are traffic_log.py's (their owner);
this module decides what to do and calls them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import pandas as pd
import sqlalchemy as sa

from llmops_dagster.feedback import redaction
from llmops_dagster.serving import traffic_log

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


def pending(engine: sa.Engine, limit: int = 50) -> pd.DataFrame:
    """Corrections waiting for review, with the question and the answer they correct: those whose
    rating counted (sent with a credential) first, then the rest, oldest first within each, so
    that a flood of uncredentialed corrections cannot bury the ones from known raters."""
    return traffic_log.pending_corrections(engine, limit)


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
            decided_at = traffic_log.decide_review(
                connection, function, feedback_id, state,
                actor.removeprefix(KEY_ACTOR) if by_key else actor, note)
        except sa.exc.DBAPIError as error:
            message = str(error.orig).splitlines()[0]
            if (getattr(error.orig, "pgcode", None) == INSUFFICIENT_PRIVILEGE
                    and not message.startswith("permission denied")):
                raise ReviewError(message) from None
            raise
        if decided_at is None:
            current = traffic_log.review_state(connection, feedback_id)
            if current is None:
                raise ReviewError(f"feedback {feedback_id} does not exist (or was purged)")
            raise ReviewError(f"feedback {feedback_id} is not pending review (state: "
                              f"{current.review_state or 'no correction to review'})")
    return ReviewDecision(feedback_id, state, actor, decided_at, note)


def audit_trail(engine: sa.Engine, feedback_id: int) -> list[dict]:
    return traffic_log.audit_trail(engine, feedback_id)


@dataclass(frozen=True)
class PurgeFilter:
    """Which feedback rows to purge: any combination, all conditions must hold."""

    ids: tuple[int, ...] = ()
    key_name: str | None = None  # rows sent with this API key
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before
    answered_until: datetime | None = None  # ratings of answers logged before this time

    def check(self) -> None:
        """Refuse a filter that would match every row."""
        if (self.answered_until is None and not self.ids and self.key_name is None
                and self.since is None and self.until is None):
            raise ReviewError("a purge needs at least one filter: ids, key, or a time range")


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
    which.check()
    with engine.begin() as connection:
        ids = traffic_log.lock_for_purge(connection, which)
        if not ids:
            return PurgeResult()
        outcome = redaction.redact(connection, ids, actor=actor, reason=reason)
        rows = traffic_log.delete_feedback(connection, ids)
        traffic_log.record_purges(
            connection,
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
    cutoff = traffic_log.feedback_cutoff(engine, retention_days, now)
    return purge(engine, PurgeFilter(until=cutoff), actor="retention",
                 reason=f"older than the {retention_days}-day retention (feedback_table.retention_days)")


def purge_answers(engine: sa.Engine, until: datetime, actor: str, reason: str) -> tuple[int, PurgeResult]:
    """Delete the answers logged before `until` (prompts and responses in request_log) and every
    rating of them (purged as `purge` does, with audit records, redactions and flags). Returns
    (answers deleted, ratings purged). A trace of a deleted answer then says it is not found."""
    ratings = purge(engine, PurgeFilter(answered_until=until), actor=actor, reason=reason)
    return traffic_log.delete_answers(engine, until), ratings


def expire_answers(engine: sa.Engine, retention_days: int) -> tuple[int, PurgeResult]:
    """purge_answers of everything older than `retention_days` (0: keep forever), as 'retention'."""
    if retention_days <= 0:
        return 0, PurgeResult()
    cutoff = traffic_log.answer_cutoff(engine, retention_days)
    return purge_answers(engine, cutoff, actor="retention",
                         reason=f"answer older than the {retention_days}-day retention "
                                "(feedback_table.answer_retention_days)")
