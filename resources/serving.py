"""Ray Serve for the platform: a local Ray head on 127.0.0.1 by default, any cluster by address."""

import hashlib
import json
import os
import time
import urllib.request
from pathlib import Path

import dagster as dg
from pydantic import Field

from llmops_dagster.serving import ray_cluster
from llmops_dagster.serving.app import ServingConfig, build_app
from llmops_dagster.settings import llmops_home

APP_NAME = "llmops"


class RayServeResource(dg.ConfigurableResource):
    """Deploys the serving app; a new model version rolls out replica by replica."""

    address_env_var: str = Field(default="RAY_ADDRESS", description="Environment variable with an "
                                 "existing cluster's address; unset: a local head on 127.0.0.1.")
    http_host: str = Field(default="127.0.0.1", description="Where Serve's HTTP proxy listens.")
    http_port: int = Field(default=8000, description="Port of Serve's HTTP proxy.")
    replicas: int = Field(default=1, description="Model replicas.")
    max_replicas_per_node: int | None = Field(
        default=None, ge=1, description="Most replicas on one Ray node (Serve's option): 1 spreads "
        "them one a node and brings a replica back to a node that returns after a loss; None lets "
        "Serve pack them.")
    local_cpus: int = Field(default=2, description="CPUs of the local head.")
    local_port: int = Field(default=ray_cluster.LOCAL_PORT, description="GCS port of the local head.")

    def local_temp_dir(self) -> Path:
        """Ray's socket paths must stay short: `ray` in a folder under /tmp named after this user
        and LLMOPS_HOME, that folder private to this user (ray_cluster.private_folder)."""
        key = hashlib.sha256(f"{llmops_home()}:{self.local_port}".encode()).hexdigest()[:8]
        # bandit B108: a short path is needed for Ray's sockets; private_folder makes it 0700 and ours.
        return Path(f"/tmp/llmops-ray-{os.getuid()}-{key}") / "ray"  # nosec

    def is_local(self) -> bool:
        """Whether Serve runs on the local head (no cluster address configured)."""
        return not os.environ.get(self.address_env_var, "").strip()

    def address(self) -> str:
        if not self.is_local():
            return os.environ[self.address_env_var].strip()
        return ray_cluster.ensure_local_head(self.local_temp_dir(), self.local_cpus, self.local_port)

    def stop_local(self) -> int:
        """Stop the local head (not a cluster given by address)."""
        import ray

        ray.shutdown()
        return ray_cluster.stop_local_head(self.local_temp_dir(), self.local_port)

    def url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}"

    def served(self, timeout_s: float = 2) -> dict | None:
        """What Serve answers at /healthz (model version, config digest), or None when nothing
        answers within `timeout_s`."""
        try:
            with urllib.request.urlopen(f"{self.url()}/healthz", timeout=timeout_s) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None

    def served_version(self) -> str | None:
        return (self.served() or {}).get("model_version")

    def with_replicas(self, config: ServingConfig) -> ServingConfig:
        """`config` with this resource's replica count (what a deploy would serve)."""
        import dataclasses

        return dataclasses.replace(config, replicas=self.replicas,
                                   max_replicas_per_node=self.max_replicas_per_node)

    def deploy(self, config: ServingConfig, timeout_s: float = 180) -> str:
        """Deploy (or roll out) `config`; return once /healthz answers with its model version."""
        from ray import serve

        ray_cluster.connect(self.address(), local=self.is_local())
        # No gRPC servicers: Serve starts no gRPC proxy (it would bind "[::]:port", whatever the host).
        serve.start(http_options={"host": self.http_host, "port": self.http_port})
        serve.run(build_app(self.with_replicas(config)), name=APP_NAME, route_prefix="/",
                  blocking=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url()}/healthz", timeout=5) as response:
                    if json.loads(response.read()).get("model_version") == config.model_version:
                        return self.url()
            except OSError:
                pass
            time.sleep(0.5)
        raise dg.Failure(f"the serving app did not answer with model {config.model_version} at "
                         f"{self.url()}/healthz within {timeout_s:.0f} s")
