"""How each answer ended: request_log.finish_reason.

'stop' (the model's end of text, or a stop string the request named), 'length' (its token budget
spent) or 'cut_off' (a streamed answer whose client left before it ended: the partial answer as
sent). NULL for answers logged before it was recorded.

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    op.execute("ALTER TABLE request_log ADD COLUMN finish_reason text")
    op.execute("ALTER TABLE request_log ADD CONSTRAINT request_log_finish_reason "
               "CHECK (finish_reason IN ('stop', 'length', 'cut_off'))")


def downgrade() -> None:
    op.execute("ALTER TABLE request_log DROP COLUMN finish_reason")
