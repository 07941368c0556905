"""Serving stage: the production model behind HTTP on Ray Serve."""

from pathlib import Path

import dagster as dg
import sqlalchemy as sa

from assets.governance import approved_model
from llmops_dagster.governance import registry
from llmops_dagster.lineage import lineage_metadata, model_lineage_versions, stage_definition
from llmops_dagster.serving.app import ServingConfig
from llmops_dagster.settings import declared
from resources.database import PostgresResource
from resources.serving import RayServeResource


class ServingDeploymentConfig(dg.Config):
    max_batch_size: int = declared(ServingConfig, "max_batch_size")
    batch_wait_timeout_s: float = declared(ServingConfig, "batch_wait_timeout_s")


def serving_config(engine, version: registry.ModelVersion, database_url: str,
                   config: ServingDeploymentConfig) -> ServingConfig:
    """What a replica needs for `version`: its merged model and the prompt template it learned."""
    with engine.connect() as connection:
        prompt_set = connection.execute(
            sa.text("SELECT path, template_name FROM prompt_set_versions WHERE version = :v"),
            {"v": version.prompt_set_version}).one()
    template = (Path(prompt_set.path) / f"{prompt_set.template_name}.jinja").read_text()
    return ServingConfig(
        model_version=version.version,
        model_path=version.merged_model_path,
        prompt_template=template,
        database_url=database_url,
        lineage={"dataset_version": version.dataset_version,
                 "prompt_set_version": version.prompt_set_version,
                 "base_model_version": version.base_model_version},
        max_batch_size=config.max_batch_size,
        batch_wait_timeout_s=config.batch_wait_timeout_s,
        seq_len=version.train_config.get("seq_len", ServingConfig.seq_len),
    )


@dg.asset(**stage_definition("serving"), deps=[approved_model], kinds={"ray", "fastapi"})
def serving_deployment(
    context: dg.AssetExecutionContext, config: ServingDeploymentConfig,
    database: PostgresResource, ray_serve: RayServeResource,
) -> dg.MaterializeResult:
    """The production model served over HTTP (Ray Serve, batched) with request and feedback logs."""
    engine = database.engine()
    version = registry.production(engine)
    if version is None:
        raise dg.Failure("no model version is in production: materialize approved_model first")
    url = ray_serve.deploy(serving_config(engine, version, database.url(), config))
    context.log.info(f"model {version.version} is served at {url}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version.version),
        tags={"llmops/model_version": version.version},
        metadata={
            **lineage_metadata(context.instance, model_lineage_versions(engine, version)),
            "url": dg.MetadataValue.url(url),
            "model_version": version.version,
            "replicas": ray_serve.replicas,
            "max_batch_size": config.max_batch_size,
            "endpoints": dg.MetadataValue.md(
                "| method | path |\n|---|---|\n| POST | /v1/generate |\n| POST | /v1/feedback |\n"
                "| GET | /v1/models |\n| GET | /healthz |\n| GET | / (ask and rate) |"),
        },
    )
