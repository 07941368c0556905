"""The Dagster code location: every asset, check, job and resource of the platform."""

import dagster as dg

from assets import (
    base_model,
    dataset,
    evaluation,
    feedback,
    governance,
    preferences,
    prompts,
    serving,
    training,
)
from llmops_dagster.infra.settings import port_from_env
from llmops_dagster.serving import ray_cluster
from resources.artifacts import ArtifactStore
from resources.database import PostgresResource
from resources.embedder import EmbedderResource
from resources.loop_settings import LoopSettings
from resources.serving import RayServeResource
from resources.trainer import TrainerResource
from schedules.automation import (
    drift_sensor,
    feedback_sensor,
    nightly_retrain_schedule,
    rollback_guard,
    serving_reconciler,
)
from schedules.jobs import deploy_job, main_job, retrain_job, rollback_job
from schedules.observation import traffic_observation


def ray_serve_resource() -> RayServeResource:
    """Ray Serve with its ports from the environment (LLMOPS_SERVE_HTTP_PORT, LLMOPS_RAY_PORT), so
    that a second platform on the machine (a benchmark, a colleague's) runs beside the first; the
    daemon, its runs and the CLI all read them."""
    return RayServeResource(http_port=port_from_env("LLMOPS_SERVE_HTTP_PORT", 8000),
                            local_port=port_from_env("LLMOPS_RAY_PORT", ray_cluster.LOCAL_PORT))


defs = dg.Definitions(
    # One process a run, steps one after another in it: a step in a process of its own (Dagster's
    # default) pays ~5-8 s of imports (torch, transformers, dagster) per step on 2 cores, more than
    # most steps compute, and two CPU-bound steps at once only slow each other. On a cluster, swap
    # in a per-step executor (dagster-k8s's k8s_job_executor) here.
    executor=dg.in_process_executor,
    assets=dg.load_assets_from_modules(
        [dataset, base_model, prompts, training, evaluation, governance, serving, feedback, preferences]
    ),
    jobs=[main_job, retrain_job, deploy_job, rollback_job],
    schedules=[nightly_retrain_schedule()],
    sensors=[feedback_sensor, drift_sensor, rollback_guard, serving_reconciler, traffic_observation],
    resources={
        "database": PostgresResource(),
        "artifacts": ArtifactStore(),
        "embedder": EmbedderResource(),
        "trainer": TrainerResource(),
        "ray_serve": ray_serve_resource(),
        "loop_settings": LoopSettings(),
    },
)
