"""The platform's PostgreSQL (with pgvector): the embedded server by default, any server by URL."""


import os
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
from pydantic import Field

from llmops_dagster import database
from llmops_dagster.settings import llmops_home


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

    def admin_url(self) -> str:
        """URL of the server's maintenance database (creates databases, stores nothing)."""
        configured = os.environ.get(self.url_env_var, "").strip()
        if configured:
            return database.sqlalchemy_url(configured, setting=self.url_env_var)
        data_dir = Path(self.embedded_data_dir) if self.embedded_data_dir else llmops_home() / "pg"
        return database.embedded_server_url(data_dir)

    def url(self) -> str:
        """URL of the platform's own database, created when missing."""
        configured = os.environ.get(self.url_env_var, "").strip()
        if configured:
            # A managed server's URL names the database to use; the platform never creates one.
            return database.sqlalchemy_url(configured, setting=self.url_env_var)
        return database.ensure_database(self.admin_url(), database.PLATFORM_DATABASE)

    def engine(self) -> sa.Engine:
        """A pooled engine on the platform database, migrated to the newest schema."""
        return database.platform_engine(self.url())
