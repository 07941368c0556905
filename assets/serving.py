"""Serving stage: the production model behind HTTP on Ray Serve."""

import os
from dataclasses import asdict

import dagster as dg
from pydantic import Field

from assets.governance import approved_model
from llmops_dagster.governance import registry
from llmops_dagster.infra import secrets
from llmops_dagster.infra.database import redacted
from llmops_dagster.infra.lineage import lineage_metadata, model_lineage_versions, stage_definition
from llmops_dagster.infra.settings import declared
from llmops_dagster.loop import signals
from llmops_dagster.prompts import templates
from llmops_dagster.serving import credentials
from llmops_dagster.serving.admission import AdmissionSettings
from llmops_dagster.serving.app import ServingConfig
from resources.database import PostgresResource
from resources.serving import RayServeResource

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ENDPOINTS = ("| method | path |\n|---|---|\n| POST | /v1/generate |\n| POST | /v1/feedback |\n"
             "| GET | /v1/reviews (reviewer key) |\n| POST | /v1/reviews/{id} (reviewer key) |\n"
             "| POST | /v1/chat/completions, /v1/completions (OpenAI API, streamed or not) |\n"
             "| GET | /v1/models, /v1/models/{id} (OpenAI shape, with lineage) |\n"
             "| GET | /healthz |\n| GET | / (ask and rate) |")
# The least value of each batching setting a replica accepts (batching.BusyBatcher refuses less).
BATCHING_MINIMUMS = {"max_batch_size": 1, "batch_wait_timeout_s": 0}


class ServingDeploymentConfig(dg.Config):
    max_batch_size: int = declared(ServingConfig, "max_batch_size")
    batch_wait_timeout_s: float = declared(ServingConfig, "batch_wait_timeout_s")
    generate_requires_key: bool = declared(ServingConfig, "generate_requires_key")
    generate_rate_limit: str = declared(ServingConfig, "generate_rate_limit")
    feedback_rate_limit: str = declared(ServingConfig, "feedback_rate_limit")
    max_queued_requests: int = declared(ServingConfig, "max_queued_requests")
    # What Serve's proxies admit before a replica sees a request (admission.py).
    max_body_bytes: int = declared(AdmissionSettings, "max_body_bytes")
    body_timeout_s: float = declared(AdmissionSettings, "body_timeout_s")
    max_concurrent_per_address: int = declared(AdmissionSettings, "max_concurrent_per_address")
    max_concurrent_per_key: int = declared(AdmissionSettings, "max_concurrent_per_key")
    max_concurrent_keyed_per_address: int = declared(AdmissionSettings, "max_concurrent_keyed_per_address")
    health_wait_s: float = declared(AdmissionSettings, "health_wait_s")
    trusted_proxies: str = declared(AdmissionSettings, "trusted_proxies")
    database_url_file: str = Field(default="", description="A file holding the database URL on every "
                                   "Serve node (a mounted secret). Empty: a 0600 file the platform writes "
                                   "under $LLMOPS_HOME/secrets, readable by a local head only.")
    rollback_from: str = Field(default="", description="Set by rollback_guard's `rollback` runs: "
                               "first roll the registry back from this version (nothing when it is "
                               "no longer production), then serve the version it restores.")
    rollback_reason: str = Field(default="", description="Why (kept in the registry's audit log).")

    def admission(self) -> AdmissionSettings:
        """The proxies' admission settings; ValueError naming one out of its bounds."""
        from dataclasses import fields

        return AdmissionSettings(**{f.name: getattr(self, f.name) for f in fields(AdmissionSettings)})

    def check(self, http_host: str, on_cluster: bool = False) -> None:
        """Refuse settings that would expose the model or fail the deploy: an open /v1/generate
        off loopback, a rate limit the `limits` library cannot read, a batching or admission
        setting out of its bounds; and on a cluster, a database URL file that only this machine has."""
        from limits import parse

        for name, least in BATCHING_MINIMUMS.items():
            if getattr(self, name) < least:
                raise dg.Failure(f"serving_deployment.{name} must be at least {least}, "
                                 f"got {getattr(self, name)!r}")
        try:
            self.admission()
        except ValueError as error:
            raise dg.Failure(f"serving_deployment.{error}") from None

        if on_cluster and not self.database_url_file:
            raise dg.Failure("serving_deployment.database_url_file must name a file provisioned on "
                             "every Serve node (a mounted secret) when Serve runs on a cluster (RAY_ADDRESS)")
        if not self.generate_requires_key and http_host not in LOOPBACK_HOSTS:
            raise dg.Failure(f"serving_deployment.generate_requires_key is false while Serve listens "
                             f"on {http_host} (RayServeResource.http_host): an open /v1/generate is "
                             "allowed on loopback only")
        for name in ("generate_rate_limit", "feedback_rate_limit"):
            try:
                parse(getattr(self, name))
            except ValueError:
                raise dg.Failure(f"serving_deployment.{name} {getattr(self, name)!r} is not a rate "
                                 "such as '120/minute'") from None

    def summary(self) -> dict:
        """The deployment's settings as metadata entries a person reads."""
        return {
            "max_batch_size": self.max_batch_size,
            "generate": "API key required" if self.generate_requires_key else "open (loopback)",
            "rate_limits": f"generate {self.generate_rate_limit}, feedback "
                           f"{self.feedback_rate_limit} per key and per address",
            "admission": f"bodies up to {self.max_body_bytes} bytes within {self.body_timeout_s:g} s; "
                         f"in flight at most {self.max_concurrent_per_address} per address without "
                         f"a key, {self.max_concurrent_per_key} per key; X-Forwarded-For from "
                         f"{self.trusted_proxies or 'no proxy'}",
        }


def serving_config(engine, version: registry.ModelVersion, database_url: str,
                   config: ServingDeploymentConfig) -> ServingConfig:
    """What a replica needs for `version`: its merged model, the prompt template it learned, and
    where to read its database URL (config.database_url_file, or a 0600 file written here)."""
    url_file = config.database_url_file or str(secrets.serving_database_url_file(database_url))
    return _serving_config(engine, version, url_file, redacted(database_url), config)


def _serving_config(engine, version: registry.ModelVersion, database_url_file: str, database_name: str,
                    config: ServingDeploymentConfig) -> ServingConfig:
    """What a replica needs for `version`: its merged model and how its prompts were rendered."""
    renderer = templates.recorded_renderer(engine, version.prompt_set_version)
    return ServingConfig(
        model_version=version.version,
        model_path=version.merged_model_path,
        prompt_renderer=asdict(renderer),
        database_url_file=database_url_file,
        database=database_name,
        lineage={"dataset_version": version.dataset_version,
                 "prompt_set_version": version.prompt_set_version,
                 "base_model_version": version.base_model_version},
        max_batch_size=config.max_batch_size,
        batch_wait_timeout_s=config.batch_wait_timeout_s,
        generate_requires_key=config.generate_requires_key,
        generate_rate_limit=config.generate_rate_limit,
        feedback_rate_limit=config.feedback_rate_limit,
        max_queued_requests=config.max_queued_requests,
        admission=asdict(config.admission()),
        seq_len=version.train_config.get("seq_len", ServingConfig.seq_len),
    )


@dg.asset(**stage_definition("serving"), deps=[approved_model], kinds={"ray", "fastapi"})
def serving_deployment(
    context: dg.AssetExecutionContext, config: ServingDeploymentConfig,
    database: PostgresResource, ray_serve: RayServeResource,
) -> dg.MaterializeResult:
    """The production model served over HTTP (Ray Serve, batched) with request and feedback logs."""
    config.check(ray_serve.http_host, on_cluster=bool(os.environ.get(ray_serve.address_env_var, "").strip()))
    engine = database.engine()
    version = _version_to_serve(context, engine, config)
    credentials.signing_secret(engine)  # made here: the replicas' role may only read it
    # The replicas connect as the serving role: log answers and ratings, nothing else.
    wanted = ray_serve.with_replicas(serving_config(engine, version, database.serving_url(), config))
    served = ray_serve.served() or {}
    unchanged = (served.get("model_version"), served.get("config_digest")) == (
        wanted.model_version, wanted.digest())
    if unchanged:  # e.g. a retrain that reproduced the production model: nothing to roll out
        url = ray_serve.url()
        context.log.info(f"model {version.version} is served at {url} with this config already: no change")
    else:
        url = ray_serve.deploy(wanted)
        context.log.info(f"model {version.version} is served at {url}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version.version),
        tags={"llmops/model_version": version.version},
        metadata={
            **lineage_metadata(context.instance, model_lineage_versions(engine, version)),
            "url": dg.MetadataValue.url(url),
            "model_version": version.version,
            "change": "no change (already served)" if unchanged else "deployed",
            "replicas": ray_serve.replicas,
            **config.summary(),
            "endpoints": dg.MetadataValue.md(ENDPOINTS),
        },
    )


def _version_to_serve(context: dg.AssetExecutionContext, engine,
                      config: ServingDeploymentConfig) -> registry.ModelVersion:
    """The registry's production version, after the rollback a `rollback` run asks for."""
    if config.rollback_from:
        restored = registry.rollback(engine, actor=signals.GUARD, expected=config.rollback_from,
                                     reason=config.rollback_reason or "rollback run")
        context.log.info(f"registry: {restored.version} is production (rollback from "
                         f"{config.rollback_from} requested)")
    version = registry.production(engine)
    if version is None:
        raise dg.Failure("no model version is in production: materialize approved_model first")
    return version
