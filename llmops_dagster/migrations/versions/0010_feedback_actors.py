"""Actors: who stands behind each rating, so the loop counts people, not tokens.

request_log.client_host is the budget host of whoever asked (admission.budget_host of the client
address the proxy resolved: all of loopback is one host, IPv6 counts by /64); NULL for answers
logged before it. feedback.actor is the rating's actor: the key it came with, else the key that
asked for the answer, else the asker's host (`host:<client_host>`). Triggers and the rollback guard
count distinct actors and at most a few votes of each (traffic_log.new_negative_feedback).

Older rows: a keyed rater keeps its key; a token's rating takes the answer's key, else the one
host every old anonymous answer is counted as (`host:unknown`): one actor, as it may have been.

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    op.execute("ALTER TABLE request_log ADD COLUMN client_host text")
    op.execute("ALTER TABLE feedback ADD COLUMN actor text")
    op.execute(
        """
        UPDATE feedback f SET actor = CASE
            WHEN f.rater LIKE 'key:%' THEN f.rater
            WHEN k.name IS NOT NULL THEN 'key:' || k.name
            ELSE 'host:' || coalesce(r.client_host, 'unknown') END
        FROM request_log r LEFT JOIN api_keys k ON k.id = r.api_key_id
        WHERE r.response_id = f.response_id
        """
    )
    op.execute("UPDATE feedback SET actor = 'host:unknown' WHERE actor IS NULL")
    # A writer that names no actor (the app always does) makes every such row one actor: the
    # loop then counts fewer votes, never more.
    op.execute("ALTER TABLE feedback ALTER COLUMN actor SET DEFAULT 'host:unknown'")
    op.execute("ALTER TABLE feedback ALTER COLUMN actor SET NOT NULL")
    # The feedback sensor's window groups counted negative ratings by actor.
    op.execute("CREATE INDEX feedback_counted_actor ON feedback (actor) WHERE counted")


def downgrade() -> None:
    op.execute("DROP INDEX feedback_counted_actor")
    op.execute("ALTER TABLE feedback DROP COLUMN actor")
    op.execute("ALTER TABLE request_log DROP COLUMN client_host")
