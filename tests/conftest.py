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


# Not make run's 8000/6390: tests never touch a developer's served model. Overridable so that two
# test sessions on one machine do not share a cluster.
SERVING_HTTP_PORT = int(os.environ.get("LLMOPS_TEST_HTTP_PORT", "8011"))
SERVING_GCS_PORT = int(os.environ.get("LLMOPS_TEST_RAY_PORT", "6391"))


@pytest.fixture(scope="session")
def served_model(llmops_home):
    """A real fine-tuned model, approved and served by Ray Serve on 127.0.0.1:8011, once a session.

    Returns a dict: url, resources (for dg.materialize), instance, version, engine.
    """
    from assets.dataset import raw_examples, validated_dataset
    from assets.evaluation import eval_report
    from assets.governance import approved_model
    from assets.prompts import prompt_set
    from assets.serving import serving_deployment
    from assets.training import base_model, finetuned_checkpoint
    from resources.artifacts import ArtifactStore
    from resources.database import PostgresResource
    from resources.embedder import EmbedderResource
    from resources.serving import RayServeResource
    from resources.trainer import TrainerResource

    resources = {
        "database": PostgresResource(),
        "artifacts": ArtifactStore(root=str(llmops_home / "serving-artifacts")),
        "embedder": EmbedderResource(),
        "trainer": TrainerResource(),
        "ray_serve": RayServeResource(http_port=SERVING_HTTP_PORT, local_port=SERVING_GCS_PORT),
    }
    engine = resources["database"].engine()
    import sqlalchemy as sa

    with engine.begin() as connection:  # this session's registry may hold other tests' models
        connection.execute(sa.text("UPDATE model_versions SET stage = 'archived' "
                                   "WHERE stage = 'production'"))
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [raw_examples, validated_dataset, prompt_set, base_model, finetuned_checkpoint,
             eval_report, approved_model, serving_deployment],
            resources=resources, instance=instance,
            run_config={"ops": {
                "finetuned_checkpoint": {"config": {"max_steps": 100, "checkpoint_every": 100}},
                "eval_report": {"config": {"max_examples": 20}},
                "approved_model": {"config": {"min_token_f1": 0.3}},
            }},
        )
        assert result.success
        [event] = result.asset_materializations_for_node("serving_deployment")
        yield {
            "url": event.metadata["url"].value,
            "version": event.metadata["model_version"].value,
            "resources": resources,
            "instance": instance,
            "engine": engine,
        }
    resources["ray_serve"].stop_local()
