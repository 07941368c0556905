"""Trusted feedback: API keys, the feedback-token signing secret, who sent each rating and whether
it counts, the review queue of corrections, and an append-only audit log that outlives purges.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE api_keys (
            id          bigserial PRIMARY KEY,
            name        text        NOT NULL UNIQUE,
            role        text        NOT NULL CHECK (role IN ('client', 'rater', 'reviewer')),
            key_hash    text        NOT NULL UNIQUE,  -- SHA-256 (hex) of the key; the key is never stored
            key_prefix  text        NOT NULL,         -- its first characters, to recognise it in a list
            created_by  text        NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            revoked_at  timestamptz,
            revoked_by  text
        )
        """
    )
    op.execute(
        """
        CREATE TABLE signing_keys (
            name        text PRIMARY KEY,             -- what the secret signs ('feedback_token')
            secret      bytea       NOT NULL,         -- 32 random bytes, made on first use
            created_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("ALTER TABLE request_log ADD COLUMN api_key_id bigint REFERENCES api_keys (id)")
    # Every rating is stored, duplicates included; what counts is decided from the credential.
    op.execute("ALTER TABLE feedback DROP CONSTRAINT feedback_response_id_client_id_key")
    op.execute(
        """
        ALTER TABLE feedback
            ADD COLUMN rater         text    NOT NULL DEFAULT 'anonymous',  -- from the credential
            ADD COLUMN credential    text    NOT NULL DEFAULT 'none'
                CHECK (credential IN ('api_key', 'feedback_token', 'none')),
            ADD COLUMN api_key_id    bigint  REFERENCES api_keys (id),
            ADD COLUMN source_address text,
            ADD COLUMN counted       boolean NOT NULL DEFAULT false,  -- towards sensors and the guard
            ADD COLUMN count_reason  text    NOT NULL DEFAULT 'sent before ratings needed a credential',
            ADD COLUMN review_state  text CHECK (review_state IN ('pending', 'accepted', 'rejected')),
            ADD COLUMN reviewed_by   text,
            ADD COLUMN reviewed_at   timestamptz,
            ADD COLUMN review_note   text,
            -- The inserting transaction: with a snapshot as cursor, a row is new exactly when its
            -- transaction was not visible in the cursor's snapshot, whatever its id.
            ADD COLUMN txid          xid8    NOT NULL DEFAULT pg_current_xact_id()
        """
    )
    op.execute("UPDATE feedback SET review_state = 'pending' "
               "WHERE rating < 0 AND correction IS NOT NULL AND btrim(correction) <> ''")
    op.execute("CREATE UNIQUE INDEX feedback_counted_once ON feedback (response_id, rater) WHERE counted")
    op.execute("CREATE INDEX feedback_txid ON feedback (txid)")
    op.execute("CREATE INDEX feedback_pending_review ON feedback (id) WHERE review_state = 'pending'")
    op.execute("CREATE INDEX feedback_api_key ON feedback (api_key_id)")
    # A purge deletes a rating and its curated copy together.
    op.execute("ALTER TABLE curated_feedback DROP CONSTRAINT curated_feedback_feedback_id_fkey")
    op.execute("ALTER TABLE curated_feedback ADD CONSTRAINT curated_feedback_feedback_id_fkey "
               "FOREIGN KEY (feedback_id) REFERENCES feedback (id) ON DELETE CASCADE")
    op.execute(
        """
        CREATE TABLE feedback_audit_log (
            id           bigserial PRIMARY KEY,
            feedback_id  bigint      NOT NULL,   -- no foreign key: the record outlives a purged row
            action       text        NOT NULL CHECK (action IN ('accepted', 'rejected', 'purged')),
            actor        text        NOT NULL,   -- a key's name, a person ($USER or --by), or 'retention'
            reason       text        NOT NULL,
            details      jsonb       NOT NULL DEFAULT '{}',  -- purges: answer, rater, time; no text
            at           timestamptz NOT NULL DEFAULT clock_timestamp()
        )
        """
    )
    op.execute("CREATE INDEX feedback_audit_by_row ON feedback_audit_log (feedback_id)")


def downgrade() -> None:
    op.execute("DROP TABLE feedback_audit_log")
    op.execute("ALTER TABLE curated_feedback DROP CONSTRAINT curated_feedback_feedback_id_fkey")
    op.execute("ALTER TABLE curated_feedback ADD CONSTRAINT curated_feedback_feedback_id_fkey "
               "FOREIGN KEY (feedback_id) REFERENCES feedback (id)")
    op.execute("DROP INDEX feedback_api_key")
    op.execute("DROP INDEX feedback_pending_review")
    op.execute("DROP INDEX feedback_txid")
    op.execute("DROP INDEX feedback_counted_once")
    op.execute(
        "ALTER TABLE feedback DROP COLUMN rater, DROP COLUMN credential, DROP COLUMN api_key_id, "
        "DROP COLUMN source_address, DROP COLUMN counted, DROP COLUMN count_reason, "
        "DROP COLUMN review_state, DROP COLUMN reviewed_by, DROP COLUMN reviewed_at, "
        "DROP COLUMN review_note, DROP COLUMN txid")
    op.execute("ALTER TABLE request_log DROP COLUMN api_key_id")
    op.execute("DROP TABLE signing_keys")
    op.execute("DROP TABLE api_keys")
