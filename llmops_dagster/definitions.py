"""The Dagster code location: every asset, check, job and resource of the platform."""

import dagster as dg

from assets import dataset, evaluation, feedback, governance, prompts, serving, training
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

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(
        [dataset, prompts, training, evaluation, governance, serving, feedback]
    ),
    jobs=[main_job, retrain_job, deploy_job, rollback_job],
    schedules=[nightly_retrain_schedule()],
    sensors=[feedback_sensor, drift_sensor, rollback_guard, serving_reconciler],
    resources={
        "database": PostgresResource(),
        "artifacts": ArtifactStore(),
        "embedder": EmbedderResource(),
        "trainer": TrainerResource(),
        "ray_serve": RayServeResource(),
        "loop_settings": LoopSettings(),
    },
)
