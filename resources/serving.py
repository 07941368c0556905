"""Ray Serve for the platform: a local Ray head on 127.0.0.1 by default, any cluster by address."""

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import dagster as dg
from pydantic import Field

from llmops_dagster.infra.settings import llmops_home
from llmops_dagster.serving import admission, ray_cluster
from llmops_dagster.serving.app import REPLICA_CPUS, ServingConfig, build_app

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
    max_surge_percent: int = Field(
        default=100, ge=0, le=100, description="Extra replicas a rollout may start before it stops "
        "old ones, in percent of `replicas` (Serve's option): 100 keeps every old replica serving "
        "until its replacement runs, and needs room for them on the cluster; 0 stops old replicas "
        "first (a cluster without spare room), and requests queue at the proxy meanwhile.")
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
        return self._health(timeout_s)[0]

    def _health(self, timeout_s: float) -> tuple[dict | None, str | None]:
        """/healthz's answer (None when nothing answers) and the digest of the admission settings
        the proxy that answered applies (admission.ADMISSION_HEADER; None without admission)."""
        try:
            with urllib.request.urlopen(f"{self.url()}/healthz", timeout=timeout_s) as response:
                return json.loads(response.read()), response.headers.get(admission.ADMISSION_HEADER)
        except (OSError, ValueError):
            return None, None

    def proxy_admission(self, timeout_s: float = 30) -> str | None:
        """The admission digest Serve's proxy answers with on its own route /-/healthz (which
        needs no app): "" when the proxy runs without admission.py, None when no proxy answers
        within `timeout_s` (a proxy starts a few seconds after `serve.start`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.url()}/-/healthz", timeout=5) as response:
                    return response.headers.get(admission.ADMISSION_HEADER, "")
            except urllib.error.HTTPError as error:  # e.g. 503 while it starts: its headers still say
                return error.headers.get(admission.ADMISSION_HEADER, "")
            except OSError:
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.2)

    def _rolled_out(self, digest: str, admitted: str, since: float) -> bool:
        """Whether the app runs `digest`'s config everywhere: Serve says RUNNING (the rollout is
        over, old replicas gone) and /healthz answers with that digest, through a proxy that
        applies the admission settings of digest `admitted`. Raises when Serve says that a deploy
        made at or after `since` (time.time()) failed; an earlier failure is the state this
        deploy replaces."""
        status, message, deployed_at = _app_status()
        if status == "DEPLOY_FAILED" and deployed_at >= since:
            raise dg.Failure(f"Serve could not deploy the serving app: {message}")
        if status != "RUNNING":
            return False
        health, admission_digest = self._health(timeout_s=5)
        return (health or {}).get("config_digest") == digest and admission_digest == admitted

    def served_version(self) -> str | None:
        return (self.served() or {}).get("model_version")

    def with_replicas(self, config: ServingConfig) -> ServingConfig:
        """`config` with this resource's replica count (what a deploy would serve)."""
        import dataclasses

        return dataclasses.replace(config, replicas=self.replicas,
                                   max_replicas_per_node=self.max_replicas_per_node)

    def rollout_surge_percent(self, replicas: int) -> int:
        """`max_surge_percent`, lowered to the room the cluster has now: the new replicas that a
        scale-up needs come first, and a surge replica that finds no CPU would stall the rollout
        (Serve keeps it pending and the old replicas serving). 0 when nothing runs yet."""
        import ray

        app = _app_overview()
        running = 0 if app is None else sum(
            n for deployment in app.deployments.values()
            for state, n in deployment.replica_states.items()
            if getattr(state, "value", state) == "RUNNING")
        if running == 0 or self.max_surge_percent == 0:
            return 0
        free = int(ray.available_resources().get("CPU", 0) // REPLICA_CPUS)
        room = max(0, free - max(0, replicas - running))
        wanted = -(-self.max_surge_percent * replicas // 100)
        surge = min(wanted, room)
        if surge < wanted:
            dg.get_dagster_logger().info(
                f"rollout surge {surge} replica(s), not {wanted}: the cluster has {free} free "
                f"replica slot(s) of {REPLICA_CPUS} CPU and the rollout needs "
                f"{max(0, replicas - running)} for its new replicas first")
        return surge * 100 // replicas  # Serve rounds up: this gives exactly `surge` replicas

    def deploy(self, config: ServingConfig, timeout_s: float = 180) -> str:
        """Deploy (or roll out) `config`; return once every replica serves it (Serve says RUNNING
        and /healthz answers with its config digest) behind a proxy that admits with its
        admission settings, or fail after `timeout_s`."""
        from ray import serve

        ray_cluster.connect(self.address(), local=self.is_local())
        # No gRPC servicers: Serve starts no gRPC proxy (it would bind "[::]:port", whatever the host).
        serve.start(http_options={"host": self.http_host, "port": self.http_port})
        admitted = self.proxy_admission()
        if admitted is None:
            raise dg.Failure(f"Serve's proxy does not answer at {self.url()}/-/healthz")
        if not admitted:
            environment = " ".join(f"{name}={value!r}" for name, value in admission.PROXY_ENV.items())
            raise dg.Failure(
                f"Serve's proxy at {self.url()} runs without the admission layer (no body limits, "
                "no in-flight caps, X-Forwarded-For believed from loopback): its Ray node was "
                f"started without `{environment}`. "
                + ("Stop the local head (`llmops serve stop`) so that the next deploy starts it "
                   "with them." if self.is_local() else
                   "Start every node of the cluster with that environment."))
        settings = admission.AdmissionSettings(**config.admission)
        admission.publish(settings)  # every proxy applies them within admission.SETTINGS_REFRESH_S
        wanted = self.with_replicas(config)
        app = build_app(wanted, max_surge_percent=self.rollout_surge_percent(wanted.replicas))
        # Not serve.run: it waits for the app without a time limit (forever, when a replica
        # cannot be scheduled); this waits `timeout_s` and then says what Serve reports.
        since = time.time() - 1  # Serve's deploy time, in its clock's whole-second slack
        serve.run_many([serve.RunTarget(target=app, name=APP_NAME, route_prefix="/")],
                       wait_for_applications_running=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._rolled_out(wanted.digest(), settings.digest(), since):
                return self.url()
            time.sleep(0.2)
        raise dg.Failure(f"the serving app did not answer with model {config.model_version} at "
                         f"{self.url()}/healthz within {timeout_s:.0f} s{_serve_status_note()}")


def _app_overview():
    """What Serve reports of the app (its ApplicationStatusOverview), None when it is not deployed."""
    from ray import serve

    return serve.status().applications.get(APP_NAME)


def _app_status() -> tuple[str, str, float]:
    """The app's status, Serve's message about it and when it was last deployed (time.time());
    ("", "", 0) when it is not deployed."""
    app = _app_overview()
    if app is None:
        return "", "", 0.0
    return str(getattr(app.status, "value", app.status)), app.message, app.last_deployed_time_s


def _serve_status_note() -> str:
    """What Serve says of the app's deployments (e.g. a replica that cannot be scheduled: a rollout
    with max_surge_percent needs room for the new replicas beside the old), for an error message."""
    try:
        app = _app_overview()
    except Exception:  # noqa: BLE001 - only a note on an error already being raised
        return ""
    if app is None:
        return ""
    notes = [f"{name}: {d.status} {d.message}".strip() for name, d in app.deployments.items() if d.message]
    return ("; Serve says: " + " | ".join(notes)) if notes else ""
