"""The feedback audit log append-only, as the model audit log is: rows can be added, never changed
or removed, by any role (only the owner, who can disable triggers, could).

Privileges (who may insert at all) are not migrations: database_roles.grant_privileges applies
them after every migration.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION append_only() RETURNS trigger AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
        END;
        $$ LANGUAGE plpgsql
        """
    )
    op.execute("CREATE TRIGGER feedback_audit_log_append_only BEFORE UPDATE OR DELETE ON feedback_audit_log "
               "FOR EACH ROW EXECUTE FUNCTION append_only()")
    # TRUNCATE fires no row triggers, so it needs a statement-level one of its own.
    op.execute("CREATE TRIGGER feedback_audit_log_no_truncate BEFORE TRUNCATE ON feedback_audit_log "
               "FOR EACH STATEMENT EXECUTE FUNCTION append_only()")


def downgrade() -> None:
    op.execute("DROP TRIGGER feedback_audit_log_no_truncate ON feedback_audit_log")
    op.execute("DROP TRIGGER feedback_audit_log_append_only ON feedback_audit_log")
    op.execute("DROP FUNCTION append_only()")
