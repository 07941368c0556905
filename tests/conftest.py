"""Shared fixtures: one real embedded PostgreSQL (pgvector) and artifact root for the test session."""

import os
import shutil
import tempfile
from pathlib import Path

import dagster as dg
import pytest

from llmops_dagster import database


@pytest.fixture(scope="session")
def llmops_home():
    """A fresh LLMOPS_HOME (short path: the server's Unix socket lives in it) for the session."""
    home = Path(tempfile.mkdtemp(prefix="llmops-test-"))
    previous = os.environ.get("LLMOPS_HOME")
    os.environ["LLMOPS_HOME"] = str(home)
    os.environ.pop("LLMOPS_DATABASE_URL", None)
    yield home
    database.stop_embedded_server(home / "pg")
    if previous is None:
        os.environ.pop("LLMOPS_HOME", None)
    else:
        os.environ["LLMOPS_HOME"] = previous
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def platform_db(llmops_home):
    """The platform's PostgreSQL resource on the embedded server, migrated."""
    from resources.database import PostgresResource

    resource = PostgresResource()
    resource.engine()
    return resource


@pytest.fixture
def resources(platform_db, tmp_path):
    """Real resources; each test gets its own artifact root."""
    from resources.artifacts import ArtifactStore
    from resources.embedder import EmbedderResource

    return {
        "database": platform_db,
        "artifacts": ArtifactStore(root=str(tmp_path / "artifacts")),
        "embedder": EmbedderResource(),
    }


@pytest.fixture
def instance():
    with dg.instance_for_test() as test_instance:
        yield test_instance
