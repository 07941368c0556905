"""Data stage: pgvector, quarantine, dataset and prompt-set versions, dataset embeddings.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None

EMBEDDING_DIMENSIONS = 384  # all-MiniLM-L6-v2


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.execute(
        """
        CREATE TABLE quarantine_rows (
            id             bigserial PRIMARY KEY,
            input_hash     text        NOT NULL,  -- SHA-256 of the source snapshot
            source         text        NOT NULL,  -- where the row came from (path or 'synthetic')
            row_number     integer     NOT NULL,  -- 1-based position in the source
            reasons        jsonb       NOT NULL,  -- every reason, as a JSON list of strings
            original_row   text        NOT NULL,  -- the whole row as JSON text, ASCII-escaped
            run_id         text,
            quarantined_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (input_hash, row_number)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE dataset_versions (
            version          text PRIMARY KEY,    -- content hash of the accepted rows
            input_hash       text        NOT NULL,
            source           text        NOT NULL,
            path             text        NOT NULL,
            rows_input       integer     NOT NULL,
            rows_accepted    integer     NOT NULL,
            rows_quarantined integer     NOT NULL,
            created_at       timestamptz NOT NULL DEFAULT now(),
            CHECK (rows_input = rows_accepted + rows_quarantined)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE prompt_set_versions (
            version         text PRIMARY KEY,     -- hash of the template and the data version
            dataset_version text        NOT NULL REFERENCES dataset_versions (version),
            template_name   text        NOT NULL,
            template_sha    text        NOT NULL,
            path            text        NOT NULL,
            train_rows      integer     NOT NULL,
            eval_rows       integer     NOT NULL,
            created_at      timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        f"""
        CREATE TABLE dataset_embeddings (
            id              bigserial PRIMARY KEY,
            dataset_version text        NOT NULL REFERENCES dataset_versions (version),
            row_number      integer     NOT NULL,  -- the row's position in its source
            prompt          text        NOT NULL,
            embedding       vector({EMBEDDING_DIMENSIONS}) NOT NULL,
            created_at      timestamptz NOT NULL DEFAULT now(),
            UNIQUE (dataset_version, row_number)
        )
        """
    )
    op.execute(
        "CREATE INDEX dataset_embeddings_hnsw ON dataset_embeddings "
        "USING hnsw (embedding vector_cosine_ops)"
    )


def downgrade() -> None:
    op.execute("DROP TABLE dataset_embeddings")
    op.execute("DROP TABLE prompt_set_versions")
    op.execute("DROP TABLE dataset_versions")
    op.execute("DROP TABLE quarantine_rows")
