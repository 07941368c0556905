"""Which embedder made each dataset embedding, so that a new dataset version reuses the vectors of
prompts an earlier version already embedded with the same model (a retrain that adds 20 feedback
rows embeds 20 prompts, not 2,000).

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    # '' for rows made before: never reused (their embedder is unknown).
    op.execute("ALTER TABLE dataset_embeddings ADD COLUMN embedder text NOT NULL DEFAULT ''")
    # A hash index: prompts of any length (a btree entry is limited to about 2.7 kB).
    op.execute("CREATE INDEX dataset_embeddings_prompt ON dataset_embeddings USING hash (prompt)")


def downgrade() -> None:
    op.execute("DROP INDEX dataset_embeddings_prompt")
    op.execute("ALTER TABLE dataset_embeddings DROP COLUMN embedder")
