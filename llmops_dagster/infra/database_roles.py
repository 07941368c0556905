"""Who may do what in the platform's PostgreSQL: three roles, each with the least it needs.

    llmops_owner    owns the platform database and its tables; runs the migrations. The only role
                    (with the server's superuser) that can ALTER or DROP a table, disable a trigger
                    or TRUNCATE.
    llmops_app      the platform: Dagster runs, sensors, the CLI. Reads and writes rows, except
                    that a model version is registered and changes stage, and a correction is
                    accepted or rejected, only through the functions below (each writes its audit
                    row in the same transaction); the feedback audit log is insert-only to it, the
                    model audit log read-only; owns Dagster's own database (Dagster migrates it).
    llmops_serving  the Ray Serve replicas, the one public-facing process: logs answers and ratings,
                    records review decisions of live reviewer keys (through a function), reads API
                    keys and the token secret; nothing else.

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
AUDIT_LOGS = ("model_audit_log", "feedback_audit_log", "artifact_redactions")

# The replicas' whole reach: table -> privileges (column lists where a column list is narrower).
# A review decision is not among them: review_decide_as_key makes it.
SERVING_PRIVILEGES = {
    "api_keys": "SELECT",
    "signing_keys": "SELECT",
    "request_log": "SELECT, INSERT",
    "feedback": "SELECT, INSERT",
    "feedback_audit_log": "INSERT",
}

# Where the application role may UPDATE some columns only. model_versions: only these (a newer
# eval report); its stage and decision are made by registry_move. feedback: all but these (a
# review decision is made by review_decide_as_person).
APP_UPDATE_ONLY = {"model_versions": ("eval_report_id", "updated_at")}
REVIEW_COLUMNS = ("review_state", "reviewed_by", "reviewed_at", "review_note")
APP_UPDATE_REFUSED = {"feedback": REVIEW_COLUMNS}
# Tables the application role may not INSERT into: rows there come from the functions only.
APP_INSERT_REFUSED = ("model_versions", "model_audit_log")

# SECURITY DEFINER functions (migration 0009) each role may call; no one else may.
APP_FUNCTIONS = (
    "registry_register(text, text, text, text, text, text, text, jsonb, bigint, text)",
    "registry_move(text, text, text, text, text, boolean)",
    "registry_flag_purged_feedback(text, bigint[])",
    "review_decide_as_person(bigint, text, text, text)",
)
SERVING_FUNCTIONS = ("review_decide_as_key(bigint, text, text, text)",)


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
    if any(not connection.execute(sa.text("SELECT has_table_privilege(:role, :table, :privilege)"),
                                  {"role": role, "table": f'public."{table}"', "privilege": privilege}
                                  ).scalar() for role, table, privilege in checks):
        return True
    return _functions_missing(connection, present) or _excess_grants(connection, present, tables)


def _functions(connection: sa.Connection, signatures: tuple[str, ...]) -> list[str]:
    """The functions of `signatures` that exist here (all of them once migration 0009 ran)."""
    return [s for s in signatures
            if connection.execute(sa.text("SELECT to_regprocedure(:s)"), {"s": s}).scalar() is not None]


def _functions_missing(connection: sa.Connection, present: set[str]) -> bool:
    wanted = {APP: APP_FUNCTIONS, SERVING: SERVING_FUNCTIONS}
    return any(not connection.execute(sa.text("SELECT has_function_privilege(:role, :f, 'EXECUTE')"),
                                      {"role": role, "f": function}).scalar()
               for role in present for function in _functions(connection, wanted.get(role, ())))


def _columns(connection: sa.Connection, table: str) -> list[str]:
    return connection.execute(sa.text(
        "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:t AS regclass) AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum"), {"t": f'public."{table}"'}).scalars().all()


def _app_updates(connection: sa.Connection, tables: list[str]) -> dict[str, tuple[list[str], list[str]]]:
    """table -> (columns the application role may UPDATE, columns it may not), for the tables
    where that is not all of them."""
    split = {}
    for table in {*APP_UPDATE_ONLY, *APP_UPDATE_REFUSED}:
        if table in tables:
            columns = _columns(connection, table)
            if table in APP_UPDATE_ONLY:
                allowed = [c for c in columns if c in APP_UPDATE_ONLY[table]]
            else:
                allowed = [c for c in columns if c not in APP_UPDATE_REFUSED[table]]
            split[table] = (allowed, [c for c in columns if c not in allowed])
    return split


def _excess_grants(connection: sa.Connection, present: set[str], tables: list[str]) -> bool:
    """Whether a role holds a privilege an older grant gave and this one takes back."""
    column_privilege = "SELECT has_column_privilege(:role, :table, :column, 'UPDATE')"
    checks = []
    if APP in present:
        checks += [(column_privilege, APP, table, column)
                   for table, (_, refused) in _app_updates(connection, tables).items()
                   for column in refused]
        checks += [("SELECT has_table_privilege(:role, :table, 'INSERT')", APP, table, None)
                   for table in APP_INSERT_REFUSED if table in tables]
    if SERVING in present and "feedback" in tables:
        checks += [(column_privilege, SERVING, "feedback", column) for column in REVIEW_COLUMNS]
    return any(connection.execute(sa.text(query), {"role": role, "table": f'public."{table}"',
                                                   "column": column}).scalar()
               for query, role, table, column in checks)


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
        for table in APP_INSERT_REFUSED:
            if table in tables:
                connection.execute(sa.text(f"REVOKE INSERT, DELETE ON {table} FROM {APP}"))
        for table, (allowed, _) in _app_updates(connection, tables).items():
            connection.execute(sa.text(f"REVOKE UPDATE ON {table} FROM {APP}"))
            if allowed:
                columns = ", ".join(f'"{column}"' for column in allowed)
                connection.execute(sa.text(f"GRANT UPDATE ({columns}) ON {table} TO {APP}"))
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
    for role, functions in ((APP, APP_FUNCTIONS), (SERVING, SERVING_FUNCTIONS)):
        if role in present:
            for function in _functions(connection, functions):
                connection.execute(sa.text(f"GRANT EXECUTE ON FUNCTION {function} TO {role}"))
