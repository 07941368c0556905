"""Writes that cannot skip their audit record, and purges that reach derived files.

Registry: a version is registered and changes stage only through registry_register and
registry_move, SECURITY DEFINER functions owned by the migrating role that write the audit row in
the same statement's transaction; the application role keeps no INSERT on model_versions or
model_audit_log and no UPDATE of a stage (database_roles.grant_privileges).

Reviews: a pending correction is decided only through review_decide_as_key (a live reviewer key,
for the Serve replicas) or review_decide_as_person (the platform's CLI, as a named person); each
writes its feedback_audit_log row with the decision. A correction may arrive already accepted only
from a live reviewer key (a trigger on feedback).

Purges: artifact_redactions records each artifact file a purge rewrote (append-only), and
model_versions.purged_feedback the purged feedback rows a version was trained on.

Each function runs with a fixed search_path (pg_catalog first, so no caller-made object shadows a
built-in) and is executable by no one until grant_privileges grants it to the role that needs it.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"

# = registry.REGISTRY_LOCK_KEY: serializes registry transitions with the Python side's.
REGISTRY_LOCK_KEY = 7_220_119_000_002
SAFE = "LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp"

FUNCTIONS = (
    "registry_register(text, text, text, text, text, text, text, jsonb, bigint, text)",
    "registry_move(text, text, text, text, text, boolean)",
    "registry_flag_purged_feedback(text, bigint[])",
    "review_record_decision(bigint, text, text, text)",
    "review_decide_as_key(bigint, text, text, text)",
    "review_decide_as_person(bigint, text, text, text)",
    "feedback_accepted_on_arrival()",
)


def upgrade() -> None:
    op.execute("ALTER TABLE model_versions ADD COLUMN purged_feedback bigint[] NOT NULL DEFAULT '{}'")
    op.execute(
        """
        CREATE TABLE artifact_redactions (
            id            bigserial PRIMARY KEY,
            kind          text        NOT NULL,  -- artifact kind: 'datasets', 'prompt_sets'
            version       text        NOT NULL,  -- the version folder's name, unchanged by the redaction
            path          text        NOT NULL,  -- the file rewritten
            feedback_ids  bigint[]    NOT NULL,  -- the purged rows whose examples were removed
            rows_removed  integer     NOT NULL,
            actor         text        NOT NULL,
            reason        text        NOT NULL,
            at            timestamptz NOT NULL DEFAULT clock_timestamp()
        )
        """
    )
    op.execute("CREATE INDEX artifact_redactions_version ON artifact_redactions (kind, version)")
    op.execute("CREATE TRIGGER artifact_redactions_append_only BEFORE UPDATE OR DELETE "
               "ON artifact_redactions FOR EACH ROW EXECUTE FUNCTION append_only()")
    op.execute("CREATE TRIGGER artifact_redactions_no_truncate BEFORE TRUNCATE ON artifact_redactions "
               "FOR EACH STATEMENT EXECUTE FUNCTION append_only()")

    op.execute(
        f"""
        CREATE FUNCTION registry_register(
            p_version text, p_dataset_version text, p_prompt_set_version text,
            p_base_model_version text, p_checkpoint_path text, p_adapter_path text,
            p_merged_model_path text, p_train_config jsonb, p_eval_report_id bigint, p_actor text
        ) RETURNS boolean {SAFE} AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock({REGISTRY_LOCK_KEY});
            -- A version made from data a purge redacted since is flagged as it arrives.
            INSERT INTO public.model_versions (version, stage, dataset_version, prompt_set_version,
                base_model_version, checkpoint_path, adapter_path, merged_model_path, train_config,
                eval_report_id, purged_feedback)
            VALUES (p_version, 'candidate', p_dataset_version, p_prompt_set_version,
                p_base_model_version, p_checkpoint_path, p_adapter_path, p_merged_model_path,
                p_train_config, p_eval_report_id,
                ARRAY(SELECT DISTINCT unnest(r.feedback_ids) FROM public.artifact_redactions r
                      WHERE (r.kind = 'datasets' AND r.version = p_dataset_version)
                         OR (r.kind = 'prompt_sets' AND r.version = p_prompt_set_version) ORDER BY 1))
            ON CONFLICT (version) DO NOTHING;
            IF NOT FOUND THEN
                RETURN false;
            END IF;
            INSERT INTO public.model_audit_log (version, from_stage, to_stage, actor, reason)
            VALUES (p_version, NULL, 'candidate', p_actor, 'registered');
            RETURN true;
        END;
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION registry_move(
            p_version text, p_from text, p_to text, p_actor text, p_reason text, p_decided boolean
        ) RETURNS boolean {SAFE} AS $$
        BEGIN
            -- The registry's transitions; 'rejected' is final.
            IF (p_from, p_to) NOT IN (('candidate', 'production'), ('candidate', 'rejected'),
                                      ('production', 'archived'), ('archived', 'production')) THEN
                RAISE EXCEPTION 'model version %: % -> % is not a registry transition',
                    p_version, p_from, p_to USING ERRCODE = 'check_violation';
            END IF;
            PERFORM pg_advisory_xact_lock({REGISTRY_LOCK_KEY});
            UPDATE public.model_versions SET stage = p_to, updated_at = now(),
                approver = CASE WHEN p_decided THEN p_actor ELSE approver END,
                reason = CASE WHEN p_decided THEN p_reason ELSE reason END
            WHERE version = p_version AND stage = p_from;
            IF NOT FOUND THEN
                RETURN false;
            END IF;
            INSERT INTO public.model_audit_log (version, from_stage, to_stage, actor, reason)
            VALUES (p_version, p_from, p_to, p_actor, p_reason);
            RETURN true;
        END;
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION registry_flag_purged_feedback(p_version text, p_feedback_ids bigint[])
        RETURNS void {SAFE} AS $$
        BEGIN
            -- Only adds: a flag is never taken back by the application.
            UPDATE public.model_versions SET purged_feedback = ARRAY(
                SELECT DISTINCT unnest(purged_feedback || p_feedback_ids) ORDER BY 1)
            WHERE version = p_version;
        END;
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION review_record_decision(p_feedback_id bigint, p_state text, p_actor text,
                                               p_note text)
        RETURNS timestamptz {SAFE} AS $$
        DECLARE
            decided_at timestamptz;
        BEGIN
            IF p_state NOT IN ('accepted', 'rejected') THEN
                RAISE EXCEPTION 'a review decision is accepted or rejected, not %', p_state
                    USING ERRCODE = 'check_violation';
            END IF;
            UPDATE public.feedback SET review_state = p_state, reviewed_by = p_actor,
                reviewed_at = clock_timestamp(), review_note = p_note
            WHERE id = p_feedback_id AND review_state = 'pending' RETURNING reviewed_at INTO decided_at;
            IF NOT FOUND THEN
                RETURN NULL;  -- not pending (or no such row): the caller says which
            END IF;
            INSERT INTO public.feedback_audit_log (feedback_id, action, actor, reason)
            VALUES (p_feedback_id, p_state, p_actor, coalesce(nullif(p_note, ''), p_state));
            RETURN decided_at;
        END;
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION review_decide_as_key(p_feedback_id bigint, p_state text, p_key_name text,
                                             p_note text)
        RETURNS timestamptz {SAFE} AS $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM public.api_keys WHERE name = p_key_name
                           AND role = 'reviewer' AND revoked_at IS NULL) THEN
                RAISE EXCEPTION 'key % is not a live reviewer key: its review of feedback % is refused',
                    p_key_name, p_feedback_id USING ERRCODE = 'insufficient_privilege';
            END IF;
            RETURN review_record_decision(p_feedback_id, p_state, 'key:' || p_key_name, p_note);
        END;
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION review_decide_as_person(p_feedback_id bigint, p_state text, p_actor text,
                                                p_note text)
        RETURNS timestamptz {SAFE} AS $$
        BEGIN
            IF coalesce(btrim(p_actor), '') = '' OR starts_with(p_actor, 'key:') THEN
                RAISE EXCEPTION 'a person''s review needs their name, not %', quote_nullable(p_actor)
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            RETURN review_record_decision(p_feedback_id, p_state, p_actor, p_note);
        END;
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION feedback_accepted_on_arrival() RETURNS trigger {SAFE} AS $$
        BEGIN
            IF NEW.review_state IS NULL OR NEW.review_state = 'pending' THEN
                RETURN NEW;
            END IF;
            IF NEW.review_state = 'accepted' AND EXISTS (
                    SELECT 1 FROM public.api_keys WHERE id = NEW.api_key_id AND role = 'reviewer'
                    AND revoked_at IS NULL AND NEW.reviewed_by = 'key:' || name) THEN
                RETURN NEW;
            END IF;
            RAISE EXCEPTION 'feedback may arrive % only from a live reviewer key (reviewed_by %)',
                NEW.review_state, quote_nullable(NEW.reviewed_by) USING ERRCODE = 'insufficient_privilege';
        END;
        $$
        """
    )
    op.execute("CREATE TRIGGER feedback_accepted_on_arrival BEFORE INSERT ON feedback "
               "FOR EACH ROW EXECUTE FUNCTION feedback_accepted_on_arrival()")
    for function in FUNCTIONS:  # PostgreSQL lets PUBLIC execute a new function by default
        op.execute(f"REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC")


def downgrade() -> None:
    op.execute("DROP TRIGGER feedback_accepted_on_arrival ON feedback")
    for function in reversed(FUNCTIONS):
        op.execute(f"DROP FUNCTION {function}")
    op.execute("DROP TABLE artifact_redactions")
    op.execute("ALTER TABLE model_versions DROP COLUMN purged_feedback")
