"""Serving: the request log of every generated answer, and people's feedback on them.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE request_log (
            response_id     uuid PRIMARY KEY,
            model_version   text        NOT NULL,   -- registry version that answered
            prompt          text        NOT NULL,   -- exactly as the client sent it
            response        text        NOT NULL,
            max_new_tokens  integer     NOT NULL,
            latency_ms      double precision NOT NULL,
            created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
        )
        """
    )
    op.execute("CREATE INDEX request_log_model_time ON request_log (model_version, created_at)")
    op.execute(
        """
        CREATE TABLE feedback (
            id           bigserial PRIMARY KEY,
            response_id  uuid        NOT NULL REFERENCES request_log (response_id),
            client_id    text        NOT NULL,      -- who rated: one rating a response and client
            rating       smallint    NOT NULL CHECK (rating IN (-1, 1)),
            correction   text,                      -- a better answer, if the person gave one
            comment      text,
            created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
            UNIQUE (response_id, client_id)
        )
        """
    )
    op.execute("CREATE INDEX feedback_created ON feedback (id, rating)")


def downgrade() -> None:
    op.execute("DROP TABLE feedback")
    op.execute("DROP TABLE request_log")
