"""The model registry: fine-tuned versions, their stage, and the append-only audit log of every change.

A version is registered as a `candidate`; `promote` makes it `production` and archives the version it
replaces, `reject` withdraws a candidate, and `rollback` restores the version that was production
before the current one. The database guarantees at most one production version (a partial unique
index) and an audit log that can only grow (triggers). Every transition runs in one transaction that
first takes a transaction-level advisory lock, so transitions from many processes apply one at a time,
each on the state the previous one committed, and the audit log's order is the order they happened.

A version is registered and changes stage only through the database functions registry_register and
registry_move (migration 0009), which write the audit row in the same transaction: the platform's
role may not insert a version or an audit row, nor update a stage, by itself.

Owns model_versions and model_audit_log: every SQL statement on them is here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa

# Any fixed 64-bit key (distinct from the migrations' key): serializes registry transitions.
REGISTRY_LOCK_KEY = 7_220_119_000_002

_COLUMNS = (
    "version, stage, dataset_version, prompt_set_version, base_model_version, checkpoint_path, "
    "adapter_path, merged_model_path, train_config, eval_report_id, approver, reason, created_at, "
    "updated_at, purged_feedback"
)


class RegistryError(ValueError):
    """A registry operation cannot be done; the message names the version and what is wrong."""


@dataclass(frozen=True)
class ModelVersion:
    version: str
    stage: str
    dataset_version: str
    prompt_set_version: str
    base_model_version: str
    checkpoint_path: str
    adapter_path: str
    merged_model_path: str
    train_config: dict
    eval_report_id: int | None
    approver: str | None
    reason: str | None
    created_at: datetime
    updated_at: datetime
    # Purged feedback rows this version was trained on (their examples are redacted from its data
    # since; the weights still learned from them).
    purged_feedback: list[int] = field(default_factory=list)


def _lock(connection: sa.Connection) -> None:
    """Wait for every other transition to commit; released when this transaction ends."""
    connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTRY_LOCK_KEY})


def _find(connection: sa.Connection, version: str) -> ModelVersion | None:
    row = connection.execute(
        sa.text(f"SELECT {_COLUMNS} FROM model_versions WHERE version = :version"), {"version": version}
    ).mappings().first()
    return ModelVersion(**row) if row else None


def _get(connection: sa.Connection, version: str) -> ModelVersion:
    found = _find(connection, version)
    if found is None:
        raise RegistryError(f"model version {version!r} is not in the registry")
    return found


def _production(connection: sa.Connection) -> ModelVersion | None:
    row = connection.execute(
        sa.text(f"SELECT {_COLUMNS} FROM model_versions WHERE stage = 'production'")
    ).mappings().first()
    return ModelVersion(**row) if row else None


def _move(
    connection: sa.Connection,
    version: ModelVersion,
    to_stage: str,
    *,
    actor: str,
    reason: str,
    decided: bool,
) -> None:
    """Change one version's stage and log it (registry_move: both or neither). `decided`: this is
    the decision itself (not its side effect), so the row records who made it and why."""
    moved = connection.execute(
        sa.text("SELECT registry_move(:version, :from_stage, :to_stage, :actor, :reason, :decided)"),
        {"version": version.version, "from_stage": version.stage, "to_stage": to_stage,
         "actor": actor, "reason": reason, "decided": decided},
    ).scalar_one()
    if not moved:
        # Only a writer that bypasses the registry's lock can get here.
        raise RegistryError(
            f"model version {version.version!r} is no longer {version.stage!r}; it was changed "
            "outside the registry"
        )


def flag_purged_feedback(connection: sa.Connection, feedback_ids: dict[str, list[int]]) -> None:
    """Record on each version (version -> ids) the purged feedback rows it was trained on; a flag
    only ever grows (registry_flag_purged_feedback)."""
    for version, ids in feedback_ids.items():
        connection.execute(sa.text("SELECT registry_flag_purged_feedback(:version, CAST(:ids AS bigint[]))"),
                           {"version": version, "ids": sorted(ids)})


def register_candidate(
    engine: sa.Engine,
    *,
    version: str,
    dataset_version: str,
    prompt_set_version: str,
    base_model_version: str,
    checkpoint_path: str,
    adapter_path: str,
    merged_model_path: str,
    train_config: dict,
    eval_report_id: int | None,
    actor: str = "policy",
) -> ModelVersion:
    """Register `version` as a candidate; a version already registered is returned as it is, with
    only its eval report updated when a new one is given."""
    with engine.begin() as connection:
        _lock(connection)
        existing = _find(connection, version)
        if existing is not None:
            if eval_report_id is not None and eval_report_id != existing.eval_report_id:
                connection.execute(
                    sa.text("UPDATE model_versions SET eval_report_id = :eval_report_id, updated_at = now() "
                            "WHERE version = :version"),
                    {"eval_report_id": eval_report_id, "version": version},
                )
                return _get(connection, version)
            return existing
        connection.execute(
            sa.text(
                "SELECT registry_register(:version, :dataset_version, :prompt_set_version, "
                ":base_model_version, :checkpoint_path, :adapter_path, :merged_model_path, "
                "CAST(:train_config AS jsonb), :eval_report_id, :actor)"
            ),
            {
                "version": version,
                "dataset_version": dataset_version,
                "prompt_set_version": prompt_set_version,
                "base_model_version": base_model_version,
                "checkpoint_path": checkpoint_path,
                "adapter_path": adapter_path,
                "merged_model_path": merged_model_path,
                "train_config": json.dumps(train_config),
                "eval_report_id": eval_report_id,
                "actor": actor,
            },
        )
        return _get(connection, version)


def lineage_row(connection: sa.Connection, version: str) -> dict | None:
    """The fields of `version` a trace shows (stage, approver, paths, the versions it was made
    from, its eval report), or None when it is not registered."""
    row = connection.execute(
        sa.text("SELECT version, stage, approver, checkpoint_path, adapter_path, "
                "merged_model_path, prompt_set_version, dataset_version, base_model_version, "
                "eval_report_id FROM model_versions WHERE version = :v"), {"v": version}
    ).mappings().first()
    return dict(row) if row is not None else None


def training_inputs(connection: sa.Connection) -> list:
    """Every version's dataset, prompt set, adapter and the adapter it was warm-started from
    (train_config.init_adapter), for what a purge reaches."""
    return connection.execute(sa.text(
        "SELECT version, dataset_version, prompt_set_version, adapter_path, "
        "train_config ->> 'init_adapter' AS init_adapter FROM model_versions")).mappings().all()


def get(engine: sa.Engine, version: str) -> ModelVersion:
    with engine.connect() as connection:
        return _get(connection, version)


def production(engine: sa.Engine) -> ModelVersion | None:
    with engine.connect() as connection:
        return _production(connection)


def list_versions(engine: sa.Engine) -> list[ModelVersion]:
    """Every registered version, newest first."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(f"SELECT {_COLUMNS} FROM model_versions ORDER BY created_at DESC, version DESC")
        ).mappings()
        return [ModelVersion(**row) for row in rows]


ROLLED_BACK = "rolled back to "  # how a rollback's archive entry starts (see rollback)


def _was_rolled_back(connection: sa.Connection, version: str) -> bool:
    """Whether `version` was ever taken out of production by a rollback."""
    return bool(connection.execute(
        sa.text("SELECT 1 FROM model_audit_log WHERE version = :v AND from_stage = 'production' "
                "AND to_stage = 'archived' AND starts_with(reason, :prefix) LIMIT 1"),
        {"v": version, "prefix": ROLLED_BACK}).scalar())


def promote(engine: sa.Engine, version: str, *, actor: str, reason: str,
            automatic: bool = False) -> ModelVersion:
    """Make `version` production and archive the version it replaces, in one transaction.
    `automatic` (the policy, not a person): a version once rolled back is refused; only a person
    brings it back, with a reason."""
    with engine.begin() as connection:
        _lock(connection)
        target = _get(connection, version)
        if target.stage == "production":
            return target
        if target.stage == "rejected":
            raise RegistryError(
                f"model version {version!r} was rejected; a rejected version cannot be promoted"
            )
        if automatic and _was_rolled_back(connection, version):
            raise RegistryError(
                f"model version {version!r} was rolled back; only a person can promote it again "
                f"(llmops models approve {version} --reason ...)")
        current = _production(connection)
        if current is not None:
            # First: the unique index allows no moment with two production rows.
            _move(connection, current, "archived", actor=actor,
                  reason=f"superseded by {version!r}: {reason}", decided=False)
        _move(connection, target, "production", actor=actor, reason=reason, decided=True)
        return _get(connection, version)


def reject(engine: sa.Engine, version: str, *, actor: str, reason: str) -> ModelVersion:
    """Withdraw a candidate for good; rejecting a rejected version changes nothing."""
    with engine.begin() as connection:
        _lock(connection)
        target = _get(connection, version)
        if target.stage == "rejected":
            return target
        if target.stage == "production":
            raise RegistryError(
                f"model version {version!r} is in production and cannot be rejected; roll back instead"
            )
        if target.stage != "candidate":
            raise RegistryError(
                f"model version {version!r} is {target.stage}; only a candidate can be rejected"
            )
        _move(connection, target, "rejected", actor=actor, reason=reason, decided=True)
        return _get(connection, version)


def _previous_production(connection: sa.Connection, current: str) -> str | None:
    """The version a rollback of `current` restores: the last one archived from production, other
    than `current`, that was not itself rolled back (so a second rollback never brings back the
    version the first one took out)."""
    return connection.execute(
        sa.text(
            "SELECT a.version FROM model_audit_log a JOIN model_versions v USING (version) "
            "WHERE a.from_stage = 'production' AND a.to_stage = 'archived' AND a.version <> :current "
            "AND v.stage = 'archived' AND NOT EXISTS (SELECT 1 FROM model_audit_log r "
            "WHERE r.version = a.version AND r.from_stage = 'production' AND r.to_stage = 'archived' "
            "AND starts_with(r.reason, :prefix)) ORDER BY a.id DESC LIMIT 1"
        ),
        {"current": current, "prefix": ROLLED_BACK},
    ).scalar()


def rollback(engine: sa.Engine, *, actor: str, reason: str,
             expected: str | None = None) -> ModelVersion:
    """Archive the production version and restore the one that was production before it.
    `expected`: the version the decision was about; when production is no longer it, nothing
    changes (a rollback run retried after it applied, or overtaken by a person) and the current
    production version is returned."""
    with engine.begin() as connection:
        _lock(connection)
        current = _production(connection)
        if current is None:
            raise RegistryError("no model version is in production; there is nothing to roll back")
        if expected is not None and current.version != expected:
            return current
        previous_version = _previous_production(connection, current.version)
        if previous_version is None:
            raise RegistryError(
                f"model version {current.version!r} is the first production version; "
                "there is no previous version to roll back to"
            )
        previous = _get(connection, previous_version)
        if previous.stage != "archived":
            raise RegistryError(
                f"cannot roll back to model version {previous_version!r}: "
                f"it is {previous.stage}, not archived"
            )
        _move(connection, current, "archived", actor=actor,
              reason=f"{ROLLED_BACK}{previous_version!r}: {reason}", decided=False)
        _move(connection, previous, "production", actor=actor,
              reason=f"rollback from {current.version!r}: {reason}", decided=True)
        return _get(connection, previous_version)


def audit_log(engine: sa.Engine, version: str | None = None) -> list[dict]:
    """The audit log, oldest first; only `version`'s entries when one is given."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT id, version, from_stage, to_stage, actor, reason, at FROM model_audit_log "
                "WHERE CAST(:version AS text) IS NULL OR version = :version ORDER BY id"
            ),
            {"version": version},
        ).mappings()
        return [dict(row) for row in rows]


@dataclass(frozen=True)
class Promotion:
    """How the production version got there: its audit entry (the decision's id) and who did it."""

    version: str
    audit_id: int
    actor: str
    reason: str
    at: datetime

    @property
    def by_rollback(self) -> bool:
        return self.reason.startswith("rollback from ")


def current_promotion(engine: sa.Engine) -> Promotion | None:
    """The audit entry that made the current production version production."""
    with engine.connect() as connection:
        row = connection.execute(sa.text(
            "SELECT a.version, a.id AS audit_id, a.actor, a.reason, a.at FROM model_audit_log a "
            "JOIN model_versions v USING (version) WHERE v.stage = 'production' "
            "AND a.to_stage = 'production' ORDER BY a.id DESC LIMIT 1")).mappings().first()
    return Promotion(**row) if row else None


def promoted_at(engine: sa.Engine, version: str) -> datetime | None:
    """When `version` last became production (None: never)."""
    with engine.connect() as connection:
        return connection.execute(sa.text(
            "SELECT max(at) FROM model_audit_log WHERE version = :v AND to_stage = 'production'"),
            {"v": version}).scalar()


def previous_production(engine: sa.Engine) -> str | None:
    """The version that was production before the current one (what a rollback would restore)."""
    with engine.connect() as connection:
        current = _production(connection)
        return _previous_production(connection, current.version) if current else None
