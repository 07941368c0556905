"""The earlier turns of a chat request, so that an answer's lineage and a correction made from it
(a training example) keep the conversation the answer was given in.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    # NULL: a single-turn request (every request before this revision was one).
    op.execute("ALTER TABLE request_log ADD COLUMN context jsonb")


def downgrade() -> None:
    op.execute("ALTER TABLE request_log DROP COLUMN context")
