"""The platform database: embedded server reuse, a server given by URL, migrations, bad settings."""

import multiprocessing
import uuid

import pytest
import sqlalchemy as sa

from llmops_dagster.infra import database
from resources.database import PostgresResource


def test_embedded_server_is_reused(platform_db):
    assert platform_db.admin_url() == platform_db.admin_url()
    with platform_db.engine().connect() as connection:
        head = sorted(p.name[:4] for p in database.MIGRATIONS_DIR.glob("versions/0*.py"))[-1]
        assert connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == head
        assert connection.execute(
            sa.text("SELECT extname FROM pg_extension WHERE extname = 'vector'")
        ).scalar() == "vector"


def _migrate(url: str) -> None:
    database.migrate(url)


def test_server_by_url_is_migrated_once_under_concurrency(platform_db, monkeypatch):
    url = database.ensure_database(platform_db.admin_url(), f"by_url_{uuid.uuid4().hex[:12]}")
    bare = url.replace("postgresql+psycopg2://", "postgresql://")  # as a user would write it
    monkeypatch.setenv("LLMOPS_DATABASE_URL", bare)
    assert PostgresResource().url() == url
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_migrate, args=(url,)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    with PostgresResource().engine().connect() as connection:
        tables = set(connection.execute(
            sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
    assert {"quarantine_rows", "dataset_versions", "prompt_set_versions", "dataset_embeddings"} <= tables


def test_a_bad_url_names_the_setting(monkeypatch):
    monkeypatch.setenv("LLMOPS_DATABASE_URL", "mysql://db.example/llmops")
    with pytest.raises(database.DatabaseConfigError, match="LLMOPS_DATABASE_URL must be a postgresql://"):
        PostgresResource().url()
