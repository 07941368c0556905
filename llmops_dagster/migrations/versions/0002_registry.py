"""Evaluation and governance: eval reports, the model registry, and its append-only audit log.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE eval_reports (
            id                  bigserial PRIMARY KEY,
            candidate_version   text        NOT NULL,  -- the fine-tune version judged
            champion_version    text,                  -- production model version at the time
            dataset_version     text        NOT NULL,
            prompt_set_version  text        NOT NULL,
            metrics             jsonb       NOT NULL,  -- {model: {metric: value}}: candidate, champion, base
            slices              jsonb       NOT NULL,  -- {model: {intent: {metric: value}}}
            comparison          jsonb       NOT NULL,  -- paired bootstrap: candidate - champion
            created_at          timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        """
        CREATE TABLE model_versions (
            version             text PRIMARY KEY,      -- = the fine-tune version
            stage               text        NOT NULL DEFAULT 'candidate'
                CHECK (stage IN ('candidate', 'production', 'archived', 'rejected')),
            dataset_version     text        NOT NULL,
            prompt_set_version  text        NOT NULL,
            base_model_version  text        NOT NULL,
            checkpoint_path     text        NOT NULL,
            adapter_path        text        NOT NULL,
            merged_model_path   text        NOT NULL,
            train_config        jsonb       NOT NULL,
            eval_report_id      bigint REFERENCES eval_reports (id),
            approver            text,
            reason              text,
            created_at          timestamptz NOT NULL DEFAULT now(),
            updated_at          timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    # At most one production version, enforced by the database itself.
    op.execute(
        "CREATE UNIQUE INDEX model_versions_one_production ON model_versions ((stage)) "
        "WHERE stage = 'production'"
    )
    op.execute(
        """
        CREATE TABLE model_audit_log (
            id          bigserial PRIMARY KEY,
            version     text        NOT NULL REFERENCES model_versions (version),
            from_stage  text,                      -- NULL when the version is registered
            to_stage    text        NOT NULL,
            actor       text        NOT NULL,      -- a person, or 'policy' for automatic decisions
            reason      text        NOT NULL,
            at          timestamptz NOT NULL DEFAULT clock_timestamp()
        )
        """
    )
    op.execute(
        """
        CREATE FUNCTION model_audit_log_append_only() RETURNS trigger AS $$
        BEGIN
            RAISE EXCEPTION 'model_audit_log is append-only: % refused', TG_OP;
        END;
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        "CREATE TRIGGER model_audit_log_append_only BEFORE UPDATE OR DELETE ON model_audit_log "
        "FOR EACH ROW EXECUTE FUNCTION model_audit_log_append_only()"
    )
    # TRUNCATE fires no row triggers, so it needs a statement-level one of its own.
    op.execute(
        "CREATE TRIGGER model_audit_log_no_truncate BEFORE TRUNCATE ON model_audit_log "
        "FOR EACH STATEMENT EXECUTE FUNCTION model_audit_log_append_only()"
    )


def downgrade() -> None:
    op.execute("DROP TABLE model_audit_log")
    op.execute("DROP FUNCTION model_audit_log_append_only()")
    op.execute("DROP TABLE model_versions")
    op.execute("DROP TABLE eval_reports")
