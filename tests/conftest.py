"""Shared fixtures: one real embedded PostgreSQL (pgvector) server for the test session, and a
database and artifact root of its own for every test that writes data, models or runs.

Isolation: a test that writes (quarantine rows, versions, models, requests, feedback, runs) takes
`fresh_database` (directly or through `resources` or `served_model`), a new database on the session's
server named by LLMOPS_DATABASE_URL for that test only, its own Dagster instance and its own artifact
root under tmp_path. No test can see another's rows, so the suite passes in any order.
"""

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from llmops_dagster.infra import database

# Not make run's 8000/6390: tests never touch a developer's served model. Overridable so that two
# test sessions on one machine do not share a cluster.
SERVING_HTTP_PORT = int(os.environ.get("LLMOPS_TEST_HTTP_PORT", "8011"))
SERVING_GCS_PORT = int(os.environ.get("LLMOPS_TEST_RAY_PORT", "6391"))
SERVED_TEMPLATE_DATABASE = "served_template"
# Tests send thousands of requests from 127.0.0.1 on purpose, many at once; the rate limits and the
# in-flight caps have tests of their own (test_feedback_attacks.py, test_serving_abuse.py), which
# deploy with small ones.
UNLIMITED = {"generate_rate_limit": "1000000/minute", "feedback_rate_limit": "1000000/minute",
             "max_concurrent_per_address": 4096}


@pytest.fixture(autouse=True)
def close_idle_connections():
    """After each test, this process's pooled connections to the databases it used are closed:
    every test works on a database of its own, and their idle pools would fill the session
    server's connection slots (100) halfway through the suite."""
    yield
    database.close_idle_connections()


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
    """The platform's PostgreSQL resource on the embedded server, migrated (read-only for tests:
    tests that write take `fresh_database`)."""
    from resources.database import PostgresResource

    # Its own variable, never set: the session's embedded server whatever a test sets
    # LLMOPS_DATABASE_URL to (admin_url() is the server's superuser).
    resource = PostgresResource(url_env_var="LLMOPS_TEST_SESSION_DATABASE_URL")
    resource.engine()
    return resource


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def new_database(platform_db, name: str, template: str | None = None) -> dict[str, str]:
    """A new platform database `name` on the session's server (a copy of `template` when given),
    owned by the owner role as the embedded default's is; the environment naming it, one URL a
    role."""
    from llmops_dagster.infra.database_roles import APP, OWNER, SERVING

    if template is None:
        database.ensure_database(platform_db.admin_url(), name, owner=OWNER, extensions=("vector",))
    else:
        admin = sa.create_engine(database.with_database(platform_db.admin_url(), "postgres"),
                                 isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:  # a file-level copy: about 0.1 s, whatever it holds
                connection.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{template}" OWNER {OWNER}'))
        finally:
            admin.dispose()
    data_dir = platform_db._data_dir()
    return {variable: database.embedded_server_url(data_dir, role, name)
            for variable, role in (("LLMOPS_DATABASE_URL", APP), ("LLMOPS_DATABASE_OWNER_URL", OWNER),
                                   ("LLMOPS_SERVING_DATABASE_URL", SERVING))}


def use_database(monkeypatch, environment: dict[str, str]) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def fresh_database(platform_db, monkeypatch):
    """A migrated database of this test's own; PostgresResource() in this test points at it, as
    the application role (owner and serving roles by their own URLs)."""
    from resources.database import PostgresResource

    use_database(monkeypatch, new_database(platform_db, unique("t")))
    resource = PostgresResource()
    resource.engine()
    return resource


@pytest.fixture
def dagster_database(platform_db, monkeypatch):
    """A Dagster storage database of this test's own, owned by the application role as the
    embedded default's is; LLMOPS_DAGSTER_DATABASE_URL names it."""
    from llmops_dagster.infra.database_roles import APP

    name = unique("dagster")
    database.ensure_database(platform_db.admin_url(), name, owner=APP)
    url = database.embedded_server_url(platform_db._data_dir(), APP, name)
    monkeypatch.setenv("LLMOPS_DAGSTER_DATABASE_URL", url)
    return url


@pytest.fixture
def resources(fresh_database, tmp_path):
    """Real resources on this test's own database and artifact root."""
    from resources.artifacts import ArtifactStore
    from resources.embedder import EmbedderResource

    return {
        "database": fresh_database,
        "artifacts": ArtifactStore(root=str(tmp_path / "artifacts")),
        "embedder": EmbedderResource(),
    }


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A one-layer scratch model (Hugging Face folder) with a tokenizer trained on order questions."""
    from llmops_dagster.training.base_model import ScratchModelSpec, build_scratch_model

    texts = [f"Customer: where is order A{10000 + i}? Assistant: order A{10000 + i} ships today."
             for i in range(200)]
    folder = tmp_path_factory.mktemp("base")
    build_scratch_model(texts, ScratchModelSpec(vocab_size=300, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2), folder)
    return folder


@pytest.fixture
def instance():
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture(scope="session")
def ray_serve(llmops_home):
    """The session's local Ray head and Serve proxy on 127.0.0.1:SERVING_HTTP_PORT."""
    from resources.serving import RayServeResource

    resource = RayServeResource(http_port=SERVING_HTTP_PORT, local_port=SERVING_GCS_PORT)
    yield resource
    resource.stop_local()


@pytest.fixture(scope="session")
def served_template(platform_db, llmops_home):
    """The default model, trained, evaluated and approved once a session in a template database.

    Tests never write to it: `served_model` copies it (CREATE DATABASE ... TEMPLATE) for each test,
    and a test that needs its Dagster runs copies its instance folder. Its products live under a
    session artifact root that later tests only read (write-once folders).
    """
    from assets.dataset import raw_examples, validated_dataset
    from assets.evaluation import eval_report
    from assets.governance import approved_model
    from assets.prompts import prompt_set
    from assets.training import base_model, finetuned_checkpoint
    from llmops_dagster.governance import registry
    from resources.artifacts import ArtifactStore
    from resources.database import PostgresResource
    from resources.embedder import EmbedderResource
    from resources.trainer import TrainerResource

    environment = new_database(platform_db, SERVED_TEMPLATE_DATABASE)
    dagster_home = llmops_home / "served-template-dagster"  # its runs, copied by tests that need them
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with pytest.MonkeyPatch.context() as patch, dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for name, value in environment.items():
            patch.setenv(name, value)
        resources = {
            "database": PostgresResource(),
            "artifacts": ArtifactStore(root=str(llmops_home / "served-artifacts")),
            "embedder": EmbedderResource(),
            "trainer": TrainerResource(),
        }
        result = dg.materialize(
            [raw_examples, validated_dataset, prompt_set, base_model, finetuned_checkpoint,
             eval_report, approved_model],
            resources=resources, instance=instance,
            run_config={"ops": {"eval_report": {"config": {"max_examples": 40}}}},
        )
        assert result.success
        version = registry.production(resources["database"].engine()).version
        resources["database"].engine().dispose()  # a template database must have no open connection
    return {"version": version, "dagster_home": dagster_home}


@pytest.fixture
def served_model(served_template, platform_db, ray_serve, monkeypatch, tmp_path, instance):
    """The default model served from a database of this test's own, in a fresh Dagster instance."""
    return serve_template_copy(served_template, platform_db, ray_serve, monkeypatch, tmp_path, instance)


@pytest.fixture
def served_model_with_runs(served_template, platform_db, ray_serve, monkeypatch, tmp_path):
    """As served_model, in a copy of the template's Dagster instance (a folder of this test's own,
    its DAGSTER_HOME), so that the runs that made the served model are in its history."""
    dagster_home = tmp_path / "dagster_home"
    shutil.copytree(served_template["dagster_home"], dagster_home)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        served = serve_template_copy(served_template, platform_db, ray_serve, monkeypatch, tmp_path,
                                     instance)
        yield {**served, "dagster_home": dagster_home}


def serve_template_copy(served_template, platform_db, ray_serve, monkeypatch, tmp_path, instance,
                        config: dict = UNLIMITED):
    """The session's default model served by Ray Serve on 127.0.0.1, logging to a database of this
    test's own (a copy of the template: the same registry, versions and eval report), deployed
    with serving_deployment `config`.

    Returns a dict: url, resources (for dg.materialize), instance, version, engine, result.
    """
    from assets.serving import serving_deployment
    from resources.artifacts import ArtifactStore
    from resources.database import PostgresResource
    from resources.embedder import EmbedderResource
    from resources.trainer import TrainerResource

    use_database(monkeypatch, new_database(platform_db, unique("served"),
                                             template=SERVED_TEMPLATE_DATABASE))
    resources = {
        "database": PostgresResource(),
        "artifacts": ArtifactStore(root=str(tmp_path / "artifacts")),
        "embedder": EmbedderResource(),
        "trainer": TrainerResource(),
        "ray_serve": ray_serve,
    }
    result = dg.materialize([serving_deployment], resources=resources, instance=instance,
                            run_config={"ops": {"serving_deployment": {"config": config}}})
    assert result.success
    [event] = result.asset_materializations_for_node("serving_deployment")
    assert event.metadata["model_version"].value == served_template["version"]
    return {
        "url": event.metadata["url"].value,
        "version": served_template["version"],
        "resources": resources,
        "instance": instance,
        "engine": resources["database"].engine(),
        "result": result,
    }
