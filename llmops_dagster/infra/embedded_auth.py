"""Passwords for the embedded PostgreSQL: SCRAM for every connection, never trust.

pgserver initializes a data folder with trust authentication: any local user who reaches the Unix
socket connects as the superuser (and the socket folder is world-writable when the data folder's
path is long). The first time the platform starts a server it therefore, while trust still holds:
gives the superuser and the three platform roles (database_roles.py) random passwords, writes each
to a libpq password file of its own (0600, in a 0700 folder beside the data folder), and replaces
pg_hba.conf with scram-sha-256 for every connection. URLs then name their role and password file
(`?passfile=`), never a password, so no URL the platform prints, stores or passes holds a secret.
"""

from __future__ import annotations

import fcntl
import secrets
from pathlib import Path
from urllib.parse import quote

import sqlalchemy as sa

from llmops_dagster.infra import database_roles
from llmops_dagster.infra.secrets import write_private

SUPERUSER = "postgres"
HBA_HEADER = "# Written by llmops: every connection proves a password (SCRAM-SHA-256); no trust."
PG_HBA = f"""{HBA_HEADER}
local all all scram-sha-256
host  all all 127.0.0.1/32 scram-sha-256
host  all all ::1/128 scram-sha-256
"""


class EmbeddedAuthError(RuntimeError):
    """The embedded server requires passwords that this machine no longer has."""


def secrets_dir(data_dir: Path) -> Path:
    return data_dir.parent / "secrets"


def passfile(data_dir: Path, role: str) -> Path:
    """The libpq password file of `role` on the server in `data_dir`."""
    return secrets_dir(data_dir) / f"{data_dir.name}-{role}.pgpass"


def password(data_dir: Path, role: str) -> str:
    """The password in `role`'s password file (for a client that cannot read a password file)."""
    return passfile(data_dir, role).read_text().split(":")[4].strip()


def role_url(socket_dir: str, data_dir: Path, role: str, database: str) -> str:
    """A psycopg2 URL for `role` on `database` of the embedded server: no password in it."""
    return (f"postgresql+psycopg2://{role}@/{database}?host={quote(str(socket_dir))}"
            f"&passfile={quote(str(passfile(data_dir, role)))}")


def _secured(data_dir: Path) -> bool:
    hba = data_dir / "pg_hba.conf"
    return hba.exists() and hba.read_text().startswith(HBA_HEADER)


def _write_passfile(data_dir: Path, role: str, password: str) -> None:
    # host:port:database:user:password; a password file holds one role, for any database.
    write_private(passfile(data_dir, role), f"*:*:*:{role}:{password}\n")


def ensure_passwords(data_dir: Path, socket_dir: str) -> None:
    """Secure a server still on trust (once per data folder); check the password files otherwise.

    Safe when several processes start at once: one secures, under a lock, the others wait for it.
    """
    data_dir = Path(data_dir)
    if _secured(data_dir):
        _require_passfiles(data_dir)
        return
    secrets_dir(data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(secrets_dir(data_dir) / f".{data_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _secured(data_dir):
            _require_passfiles(data_dir)
            return
        _secure(data_dir, socket_dir)


def _require_passfiles(data_dir: Path) -> None:
    missing = [str(passfile(data_dir, role)) for role in (SUPERUSER, *database_roles.ROLES)
               if not passfile(data_dir, role).exists()]
    if missing:
        raise EmbeddedAuthError(
            f"the embedded PostgreSQL in {data_dir} requires passwords, but {', '.join(missing)} "
            "is missing: restore it from a backup, or remove the data folder to start afresh")


def _secure(data_dir: Path, socket_dir: str) -> None:
    import psycopg2.extensions

    # Trust still holds here: the superuser connects without a password, for the last time.
    trusted = f"postgresql+psycopg2://{SUPERUSER}@/postgres?host={quote(str(socket_dir))}"
    engine = sa.create_engine(trusted, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            raw = connection.connection.dbapi_connection
            for role in (SUPERUSER, *database_roles.ROLES):
                password = secrets.token_urlsafe(32)  # 256 bits
                # The server gets a SCRAM verifier, never the password: nothing to leak in its logs.
                verifier = psycopg2.extensions.encrypt_password(password, role, raw, "scram-sha-256")
                exists = connection.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"),
                                            {"r": role}).scalar()
                verb = "ALTER" if exists else "CREATE"
                options = "" if role == SUPERUSER else " LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"
                connection.execute(sa.text(f"{verb} ROLE {role}{options} PASSWORD :verifier"),
                                   {"verifier": verifier})
                _write_passfile(data_dir, role, password)
            (data_dir / "pg_hba.conf").write_text(PG_HBA)  # keeps the file's owner (pgserver's user)
            connection.execute(sa.text("SELECT pg_reload_conf()"))
    finally:
        engine.dispose()
