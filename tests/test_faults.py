"""Faults under load on the real served model: PostgreSQL killed with SIGKILL while ratings arrive,
and a Ray Serve replica killed while answers are asked for.

Touches: the session's Ray head on 127.0.0.1 (it redeploys the app), a PostgreSQL server of this
test's own (pgserver in a temporary folder; the session's server is never touched) and the
session's trained model (read only)."""

import json
import os
import signal
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from assets.serving import ServingDeploymentConfig, serving_config
from llmops_dagster.governance import registry
from llmops_dagster.infra import database
from tests.conftest import SERVED_TEMPLATE_DATABASE, UNLIMITED
from tests.traffic import Traffic

RATE_PER_S = 20


def post(url: str, body: dict, timeout: float = 30) -> tuple[int, dict, float]:
    """(status, JSON body, seconds taken); status 0 when no HTTP answer came at all."""
    started = time.monotonic()
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), time.monotonic() - started
    except urllib.error.HTTPError as error:
        return error.code, {}, time.monotonic() - started
    except OSError:
        return 0, {}, time.monotonic() - started


def template_config(platform_db, database_url: str, **settings):
    """The session's trained model as a ServingConfig that logs to `database_url`."""
    engine = sa.create_engine(database.with_database(platform_db.admin_url(), SERVED_TEMPLATE_DATABASE))
    try:
        version = registry.production(engine)
        return serving_config(engine, version, database_url,
                              ServingDeploymentConfig(**UNLIMITED, **settings))
    finally:
        engine.dispose()  # a template database must have no open connection


def questions(url: str, rate: bool):
    """One question (and, when `rate`, a down-vote with a correction by its feedback token) a call."""

    def one(number: int) -> dict:
        status, answer, took = post(f"{url}/v1/generate",
                                    {"prompt": f"Where is my order A{10000 + number}?", "max_new_tokens": 4})
        outcome = {"generate": status, "generate_s": took}
        if status == 200 and rate:
            status, stored, took = post(f"{url}/v1/feedback", {
                "response_id": answer["response_id"], "rating": -1,
                "feedback_token": answer["feedback_token"], "correction": f"Order A{10000 + number} ships."})
            outcome.update(feedback=status, feedback_s=took, stored=stored,
                           response_id=answer["response_id"])
        return outcome
    return one


def kill_postgres(data_dir: Path) -> None:
    """SIGKILL the postmaster and every backend of the server in `data_dir`."""
    postmaster = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    children = [int(p) for p in os.popen(f"pgrep -P {postmaster}").read().split()]
    for pid in [postmaster, *children]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def own_postgres():
    """A PostgreSQL server of this test's own (short path: its socket lives in it), migrated, with
    its roles and the feedback-token secret; yields its data folder and the serving role's URL."""
    from llmops_dagster.serving import credentials
    from resources.database import PostgresResource

    data_dir = Path(tempfile.mkdtemp(prefix="pgf-"))
    own = PostgresResource(url_env_var="LLMOPS_FAULTS_UNSET_URL", embedded_data_dir=str(data_dir / "pg"))
    credentials.signing_secret(own.engine())
    own.engine().dispose()
    yield data_dir / "pg", own.serving_url()
    database.stop_embedded_server(data_dir / "pg")


def test_postgres_killed_under_load_loses_no_acknowledged_rating(platform_db, served_template,
                                                                ray_serve, own_postgres):
    """While PostgreSQL is down, answers and ratings get 503 within a second (nothing is
    acknowledged that was not committed); after it restarts, serving recovers without a
    redeploy, and every rating acknowledged with a 2xx is in the database."""
    data_dir, url = own_postgres
    served = ray_serve.deploy(template_config(platform_db, url))
    with Traffic(questions(served, rate=True), RATE_PER_S) as traffic:
        time.sleep(4)
        kill_postgres(data_dir)
        killed_at = time.monotonic()
        time.sleep(4)
        database.embedded_server_url(data_dir)  # restart it (crash recovery replays the WAL)
        restarted_at = time.monotonic()
        time.sleep(6)
    outcomes = traffic.outcomes
    down = [o for o in outcomes if killed_at + 0.5 < o["at"] < restarted_at - 0.5]
    assert down and all(o["generate"] == 503 or o.get("feedback") == 503 for o in down)
    refused = [o["generate_s"] for o in down if o["generate"] == 503]
    assert refused and max(refused) < 1.0, max(refused)
    statuses = {o["generate"] for o in outcomes} | {o.get("feedback") for o in outcomes if "feedback" in o}
    assert statuses <= {200, 503}, statuses
    tail = [o for o in outcomes if o["at"] > restarted_at + 3]
    assert tail and all(o["generate"] == 200 and o["feedback"] == 200 for o in tail)

    acknowledged = {o["stored"]["feedback_id"]: o["response_id"]
                    for o in outcomes if o.get("feedback") == 200}
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            stored = dict(connection.execute(sa.text(
                "SELECT id, response_id::text FROM feedback WHERE id = ANY(:ids)"),
                {"ids": list(acknowledged)}).all())
    finally:
        engine.dispose()
    assert stored == acknowledged  # not one acknowledged rating lost
    print(f"\nPostgreSQL SIGKILL: {len(outcomes)} questions, {len(acknowledged)} ratings acknowledged, "
          f"{sum(o['generate'] == 503 or o.get('feedback') == 503 for o in outcomes)} answered 503 "
          f"(slowest {max(refused):.2f} s), 0 lost")


def model_replicas() -> list[str]:
    """Names of the live ModelServer replica actors (Serve's namespace)."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and "SERVE_REPLICA" in a["name"]
                  and "ModelServer" in a["name"])


def test_a_replica_killed_under_load_fails_at_most_one_percent(platform_db, served_template, llmops_home,
                                                              ray_serve, own_postgres):
    """Two replicas; one is killed while answers are asked for at 20 a second: at most 1% of the
    requests fail, and the killed replica is back within the health-check period plus model load."""
    import ray
    from ray import serve

    from resources.serving import RayServeResource

    _, url = own_postgres
    two = RayServeResource(http_port=ray_serve.http_port, local_port=ray_serve.local_port, replicas=2)
    served = two.deploy(template_config(platform_db, url))
    with Traffic(questions(served, rate=False), RATE_PER_S) as traffic:
        time.sleep(5)
        victim = model_replicas()[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        back_after = None
        while time.monotonic() - killed_at < 120:  # back: two replicas running, the victim not one
            states = serve.status().applications["llmops"].deployments["ModelServer"].replica_states
            running = sum(n for state, n in states.items()
                          if str(getattr(state, "value", state)) == "RUNNING")
            alive = model_replicas()
            if running == 2 and len(alive) == 2 and victim not in alive:
                back_after = time.monotonic() - killed_at
                break
            time.sleep(0.25)
        time.sleep(5)
    outcomes = traffic.outcomes
    failed = [o for o in outcomes if o["generate"] != 200]
    assert len(outcomes) >= 200
    assert len(failed) <= 0.01 * len(outcomes), (len(failed), len(outcomes), failed[:3])
    assert back_after is not None and back_after < 120, back_after
    print(f"\nreplica killed: {len(failed)} of {len(outcomes)} requests failed "
          f"({len(failed) / len(outcomes):.2%}); both replicas running again after {back_after:.1f} s")
