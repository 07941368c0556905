"""The platform's PostgreSQL (with pgvector): the embedded server by default, any server by URL."""


import os
from functools import cache
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
from pydantic import Field

from llmops_dagster.infra import database, database_roles
from llmops_dagster.infra.settings import llmops_home


@cache
def _ensure_embedded_platform_database(admin_url: str) -> None:
    """The platform database of an embedded server: created by the superuser, owned by the owner
    role, with pgvector (once a process: it costs two connections)."""
    database.ensure_database(admin_url, database.PLATFORM_DATABASE, owner=database_roles.OWNER,
                             extensions=("vector",))


class PostgresResource(dg.ConfigurableResource):
    """PostgreSQL with pgvector holding quarantine, versions, embeddings, registry and logs."""

    url_env_var: str = Field(
        default="LLMOPS_DATABASE_URL",
        description="Environment variable holding a postgresql:// URL (a secret: read at run "
        "time, never stored in config). Unset or empty: the embedded server.",
    )
    embedded_data_dir: str = Field(
        default="",
        description="Data folder of the embedded server; empty means $LLMOPS_HOME/pg.",
    )

    owner_url_env_var: str = Field(
        default="LLMOPS_DATABASE_OWNER_URL",
        description="Environment variable holding the URL of the role that owns the platform's "
        "tables and runs the migrations (a secret). Unset: the migrations run as the role of "
        "url_env_var. Ignored with the embedded server, which has its own owner role.",
    )
    serving_url_env_var: str = Field(
        default="LLMOPS_SERVING_DATABASE_URL",
        description="Environment variable holding the URL of the Ray Serve replicas' role, which "
        "may only log answers and ratings (a secret). Unset: the role of url_env_var. Ignored "
        "with the embedded server, which has its own serving role.",
    )

    def _configured(self, env_var: str) -> str:
        configured = os.environ.get(env_var, "").strip()
        return database.sqlalchemy_url(configured, setting=env_var) if configured else ""

    def _data_dir(self) -> Path:
        return Path(self.embedded_data_dir) if self.embedded_data_dir else llmops_home() / "pg"

    def admin_url(self) -> str:
        """URL of the server's maintenance database as an administrator (creates databases and
        roles, stores nothing): the embedded server's superuser, or the configured URL."""
        return (self._configured(self.url_env_var)
                or database.embedded_server_url(self._data_dir()))

    def _embedded_platform_url(self, role: str) -> str:
        _ensure_embedded_platform_database(self.admin_url())
        return database.embedded_server_url(self._data_dir(), role, database.PLATFORM_DATABASE)

    def url(self) -> str:
        """URL of the platform's own database as the application role, created when missing."""
        # A managed server's URL names the database to use; the platform never creates one.
        return (self._configured(self.url_env_var)
                or self._embedded_platform_url(database_roles.APP))

    def owner_url(self) -> str:
        """URL of the platform's database as the role that owns its tables and migrates them."""
        if self._configured(self.url_env_var):
            return self._configured(self.owner_url_env_var) or self.url()
        return self._embedded_platform_url(database_roles.OWNER)

    def serving_url(self) -> str:
        """URL of the platform's database as the Serve replicas' role."""
        if self._configured(self.url_env_var):
            return self._configured(self.serving_url_env_var) or self.url()
        return self._embedded_platform_url(database_roles.SERVING)

    def dagster_url(self) -> str:
        """URL of the `dagster` database on the same server (Dagster's runs, events, schedules),
        created when missing. Embedded: owned by the application role, which Dagster runs as
        (Dagster migrates its own tables). A server of your own: created with url_env_var's role
        (it needs CREATEDB), or set LLMOPS_DAGSTER_DATABASE_URL instead."""
        if self._configured(self.url_env_var):
            return database.ensure_database(self.admin_url(), database.DAGSTER_DATABASE)
        database.ensure_database(self.admin_url(), database.DAGSTER_DATABASE, owner=database_roles.APP)
        return database.embedded_server_url(self._data_dir(), database_roles.APP, database.DAGSTER_DATABASE)

    def engine(self) -> sa.Engine:
        """A pooled engine on the platform database as the application role, migrated to the
        newest schema by the owner role."""
        return database.platform_engine(self.url(), self.owner_url())
