"""Who may do what in the platform's PostgreSQL: three roles, each with the least it needs.

    llmops_owner    owns the platform database and its tables; runs the migrations. The only role
                    (with the server's superuser) that can ALTER or DROP a table, disable a trigger
                    or TRUNCATE.
    llmops_app      the platform: Dagster runs, sensors, the CLI. Reads and writes rows; the audit
                    logs are insert-only to it; owns Dagster's own database (Dagster migrates it).
    llmops_serving  the Ray Serve replicas, the one public-facing process: logs answers and ratings,
                    records review decisions, reads API keys and the token secret; nothing else.

The embedded server creates the roles itself (embedded_auth.py); on a server of your own a DBA
creates them (README, "A PostgreSQL of your own") and the owner grants the privileges below after
every migration, so a table a new migration adds is covered without a step of its own.
"""

from __future__ import annotations

import sqlalchemy as sa

OWNER = "llmops_owner"
APP = "llmops_app"
SERVING = "llmops_serving"
ROLES = (OWNER, APP, SERVING)

# Tables whose rows nobody but the owner may change or remove (triggers refuse it too).
AUDIT_LOGS = ("model_audit_log", "feedback_audit_log")

# The replicas' whole reach: table -> privileges (column lists where a column list is narrower).
SERVING_PRIVILEGES = {
    "api_keys": "SELECT",
    "signing_keys": "SELECT",
    "request_log": "SELECT, INSERT",
    "feedback": "SELECT, INSERT, UPDATE (review_state, reviewed_by, reviewed_at, review_note)",
    "feedback_audit_log": "INSERT",
}


def existing_roles(connection: sa.Connection) -> set[str]:
    return set(connection.execute(sa.text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:names)"),
                                  {"names": list(ROLES)}).scalars())


def _missing_grants(connection: sa.Connection, present: set[str], tables: list[str]) -> bool:
    """Whether some table lacks a privilege its role should have (a new table, a new role): the
    grants run only then, not on every start (each GRANT rewrites the table's catalog row)."""
    checks = []
    if APP in present:
        checks += [(APP, table, "SELECT") for table in tables]
    if SERVING in present:
        checks += [(SERVING, table, "INSERT" if "INSERT" in privileges else "SELECT")
                   for table, privileges in SERVING_PRIVILEGES.items() if table in tables]
    return any(not connection.execute(sa.text("SELECT has_table_privilege(:role, :table, :privilege)"),
                                      {"role": role, "table": f'public."{table}"', "privilege": privilege}
                                      ).scalar() for role, table, privilege in checks)


def grant_privileges(connection: sa.Connection) -> None:
    """Grant the app and serving roles (those that exist on this server) their privileges on every
    table of the platform database, and nothing more. Run by the owner right after migrating,
    under the migration lock (concurrent GRANTs on one table fail with "tuple concurrently updated")."""
    present = existing_roles(connection) - {OWNER}
    tables = connection.execute(sa.text(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tableowner = current_user"
    )).scalars().all()
    if not tables or not present or not _missing_grants(connection, present, tables):
        return
    every = ", ".join(f'"{table}"' for table in tables)
    for role in present:
        connection.execute(sa.text(f"GRANT USAGE ON SCHEMA public TO {role}"))
        connection.execute(sa.text(f"REVOKE ALL ON {every} FROM {role}"))
        connection.execute(sa.text(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}"))
    if APP in present:
        connection.execute(sa.text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {every} TO {APP}"))
        connection.execute(sa.text(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {APP}"))
        audit = ", ".join(table for table in AUDIT_LOGS if table in tables)
        if audit:
            connection.execute(sa.text(f"REVOKE UPDATE, DELETE ON {audit} FROM {APP}"))
        if "alembic_version" in tables:
            connection.execute(sa.text(f"REVOKE INSERT, UPDATE, DELETE ON alembic_version FROM {APP}"))
    if SERVING in present:
        for table, privileges in SERVING_PRIVILEGES.items():
            if table not in tables:
                continue
            connection.execute(sa.text(f"GRANT {privileges} ON {table} TO {SERVING}"))
            if "INSERT" in privileges:  # the sequences its column defaults draw from (serial ids)
                for sequence in connection.execute(sa.text(
                        "SELECT s.oid::regclass::text FROM pg_depend d JOIN pg_class s ON s.oid = d.objid "
                        "WHERE d.refobjid = CAST(:t AS regclass) AND s.relkind = 'S' "
                        "AND d.deptype IN ('a', 'i')"), {"t": table}).scalars().all():
                    connection.execute(sa.text(f"GRANT USAGE ON SEQUENCE {sequence} TO {SERVING}"))
