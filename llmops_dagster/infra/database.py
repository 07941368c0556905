"""PostgreSQL with pgvector for the platform: the embedded default, any server by URL, migrations.

With no URL configured the platform starts an embedded PostgreSQL 16 + pgvector from the `pgserver`
package in a data folder of its own. The server keeps running after the process that started it
exits, so later runs, the Dagster webserver, daemon and training ranks all reuse it; `llmops db stop`
stops it cleanly. The schema is created and upgraded by the Alembic migrations in `migrations/`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa

from llmops_dagster.infra import database_roles, embedded_auth

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
PLATFORM_DATABASE = "llmops"
DAGSTER_DATABASE = "dagster"
# Any fixed 64-bit key: serializes migrations when several processes start at once.
MIGRATION_LOCK_KEY = 7_220_119_000_001

_lock = threading.Lock()


class DatabaseConfigError(ValueError):
    """The database setting cannot be used; the message names the setting."""


def sqlalchemy_url(url: str, setting: str = "LLMOPS_DATABASE_URL") -> str:
    """Use psycopg2 for any PostgreSQL URL: SQLAlchemy 2.1 maps bare `postgresql://` to psycopg 3,
    which Dagster's Postgres storage cannot use (its NOTIFY statement fails to parse)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql", "postgresql+psycopg2"):
        raise DatabaseConfigError(
            f"{setting} must be a postgresql:// URL, got scheme {parts.scheme!r}"
        )
    return urlunsplit(parts._replace(scheme="postgresql+psycopg2"))


def redacted(url: str) -> str:
    """The URL with its password replaced by ***, for anything a person or a log reads."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _import_pgserver() -> None:
    """Import pgserver without platformdirs' RuntimeDirWarning that XDG_RUNTIME_DIR is unset: its
    class body asks for the user's runtime folder (for a lock file shared by every process), and
    where no login session sets one (a container, cron, ssh without systemd-logind) the fallback,
    a private 0700 runtime-<uid> folder under the temporary folder, is the right one."""
    import warnings

    from platformdirs import RuntimeDirWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set, falling back to ",
                                category=RuntimeDirWarning)
        import pgserver  # noqa: F401


def _embedded_server(data_dir: Path):
    _import_pgserver()
    import pgserver
    from pgserver.utils import PostmasterInfo

    data_dir.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process and is reused by the next one.
    server = pgserver.get_server(data_dir, cleanup_mode=None)
    # pgserver keeps one handle a folder for the life of the process: a server stopped or killed
    # since (llmops db stop, a crash) is started again here, not assumed to be running.
    info = PostmasterInfo.read_from_pgdata(data_dir)
    if info is None or not info.is_running():
        server.ensure_postgres_running()
    return server


def embedded_server_url(data_dir: Path, role: str = embedded_auth.SUPERUSER,
                        database: str = "postgres") -> str:
    """Start (or reuse) the embedded server in `data_dir`, secured with passwords on first start
    (embedded_auth.py); return a psycopg2 URL for `role` on `database` (the superuser on the
    maintenance database by default: it creates databases and roles, stores nothing).

    The socket may live under the runtime folder when `data_dir` is a long path, so the URL
    always comes from the server, never from the folder name.
    """
    data_dir = Path(data_dir).resolve()
    with _lock:
        server = _embedded_server(data_dir)
        socket_dir = server.get_postmaster_info().socket_dir
        embedded_auth.ensure_passwords(data_dir, socket_dir)
        return embedded_auth.role_url(socket_dir, data_dir, role, database)


def stop_embedded_server(data_dir: Path) -> bool:
    """Stop the embedded server cleanly (pg_ctl stop, fast mode); False when none was running."""
    _import_pgserver()
    from pgserver._commands import pg_ctl
    from pgserver.utils import PostmasterInfo

    data_dir = Path(data_dir).resolve()
    info = PostmasterInfo.read_from_pgdata(data_dir)
    if info is None or not info.is_running():
        return False
    user = "pgserver" if _running_as_root() else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data_dir, user=user)
    return True


def _running_as_root() -> bool:
    import os

    return hasattr(os, "geteuid") and os.geteuid() == 0


def ensure_database(admin_url: str, name: str, owner: str | None = None,
                    extensions: tuple[str, ...] = ()) -> str:
    """Create database `name` on the server when it is missing (owned by `owner` when given, with
    `extensions` created by the admin: pgvector is not a trusted extension); return its URL.

    A database made before it had an owner role (an older embedded server) is handed to `owner`
    with everything in it."""
    engine = sa.create_engine(with_database(admin_url, "postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            current = connection.execute(
                sa.text("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = :name"),
                {"name": name}).scalar()
            if current is None:
                try:
                    connection.execute(sa.text(f'CREATE DATABASE "{name}"'
                                               + (f' OWNER "{owner}"' if owner else "")))
                except sa.exc.ProgrammingError as error:  # created by a concurrent process
                    if "already exists" not in str(error):
                        raise
            elif owner and current != owner:
                _hand_over(with_database(admin_url, name), owner)
                connection.execute(sa.text(f'ALTER DATABASE "{name}" OWNER TO "{owner}"'))
    finally:
        engine.dispose()
    url = with_database(admin_url, name)
    if extensions:
        engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                for extension in extensions:
                    connection.execute(sa.text(f'CREATE EXTENSION IF NOT EXISTS "{extension}"'))
        finally:
            engine.dispose()
    return url


def _hand_over(url: str, owner: str) -> None:
    """Make `owner` the owner of every table, view, sequence and function in the public schema of
    the database at `url` (tables first: a table's own sequences move with it)."""
    kinds = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW", "S": "SEQUENCE"}
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            for relkinds in (("r", "p", "v", "m"), ("S",)):
                rows = connection.execute(sa.text(
                    "SELECT c.relname, c.relkind FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = 'public' AND c.relkind = ANY(:kinds) "
                    "AND pg_get_userbyid(c.relowner) <> :owner"), {"kinds": list(relkinds), "owner": owner})
                for relname, relkind in rows.all():
                    connection.execute(
                        sa.text(f'ALTER {kinds[relkind]} public."{relname}" OWNER TO "{owner}"'))
            functions = connection.execute(sa.text(
                "SELECT p.oid::regprocedure::text FROM pg_proc p "
                "JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE n.nspname = 'public' AND pg_get_userbyid(p.proowner) <> :owner AND NOT EXISTS "
                "(SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')"), {"owner": owner})
            for signature in functions.scalars().all():
                connection.execute(sa.text(f"ALTER FUNCTION {signature} OWNER TO \"{owner}\""))
    finally:
        engine.dispose()


def migrate(url: str) -> None:
    """Apply every Alembic migration up to head, one process at a time (advisory lock)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            # A transaction-level lock: released only after the migration's commit, so the next
            # process sees the upgraded schema and has nothing left to do.
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            database_roles.grant_privileges(connection)
    except sa.exc.ProgrammingError as error:
        if getattr(error.orig, "pgcode", None) not in ("42501",):  # insufficient_privilege
            raise
        user = sa.engine.make_url(url).username
        raise DatabaseConfigError(
            f"role {user!r} may not change the platform's schema ({str(error.orig).splitlines()[0]}): "
            "set LLMOPS_DATABASE_OWNER_URL to the URL of the role that owns the tables") from None
    finally:
        engine.dispose()


_ENGINES: dict[tuple[str, str | None], sa.Engine] = {}


def platform_engine(url: str, owner_url: str | None = None) -> sa.Engine:
    """One engine per URL and process, on a database migrated (by `owner_url`, the owner role,
    when given: the role of `url` may not change the schema)."""
    key = (url, owner_url)
    if key not in _ENGINES:
        migrate(owner_url or url)
        _ENGINES[key] = sa.create_engine(url, pool_pre_ping=True)
    return _ENGINES[key]


def close_idle_connections() -> int:
    """Close the pooled connections of every engine this process made (they stay usable and
    connect again when next used): a process that works on many databases in turn, such as the
    test session, would otherwise hold idle connections to each until the server has no slot left.
    Returns the number of engines."""
    for engine in _ENGINES.values():
        engine.dispose()
    return len(_ENGINES)
