"""Curated feedback: each rating joined with its request, labelled, embedded; corrections become
candidate training examples.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE curated_feedback (
            feedback_id    bigint PRIMARY KEY REFERENCES feedback (id),
            response_id    uuid        NOT NULL REFERENCES request_log (response_id),
            model_version  text        NOT NULL,
            prompt         text        NOT NULL,
            answer         text        NOT NULL,
            label          text        NOT NULL CHECK (label IN ('positive', 'negative')),
            correction     text,                 -- a candidate training example when not NULL
            embedding      vector(384) NOT NULL, -- of the prompt (all-MiniLM-L6-v2)
            curated_at     timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        "CREATE INDEX curated_feedback_hnsw ON curated_feedback USING hnsw (embedding vector_cosine_ops)"
    )


def downgrade() -> None:
    op.execute("DROP TABLE curated_feedback")
