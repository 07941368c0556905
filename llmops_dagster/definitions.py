"""The Dagster code location: every asset, check, job and resource of the platform."""

import dagster as dg

from assets import dataset, evaluation, feedback, governance, prompts, serving, training
from resources.artifacts import ArtifactStore
from resources.database import PostgresResource
from resources.embedder import EmbedderResource
from resources.serving import RayServeResource
from resources.trainer import TrainerResource
from schedules.jobs import main_job

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(
        [dataset, prompts, training, evaluation, governance, serving, feedback]
    ),
    jobs=[main_job],
    resources={
        "database": PostgresResource(),
        "artifacts": ArtifactStore(),
        "embedder": EmbedderResource(),
        "trainer": TrainerResource(),
        "ray_serve": RayServeResource(),
    },
)
