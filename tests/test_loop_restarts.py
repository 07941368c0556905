"""The loop's sensors under a daemon that dies at random points: over a hundred restarts across
feedback, guard and drift triggers leave exactly one run per decision, the cursor never ahead of
the runs it requested, and the registry and the served version equal at the end.

The daemon here is a small model of Dagster's: it evaluates a sensor with the last saved cursor,
submits the run requests (a run key used before is skipped, as Dagster does), then saves the
cursor. A crash lands before the submit (nothing submitted, cursor not saved) or after it (runs
submitted, cursor not saved); the next tick evaluates again from the saved cursor. The sensors,
PostgreSQL, the registry and the Dagster instance are the real ones; a "run" applies what the real
run would (a rollback run rolls the registry back and serves the result) and then finishes.
"""

import random

import dagster as dg

from llmops_dagster.dataset import embeddings
from llmops_dagster.dataset.synthetic_data import generate_examples
from llmops_dagster.definitions import defs
from llmops_dagster.governance import registry
from resources.database import PostgresResource
from resources.embedder import EmbedderResource
from resources.loop_settings import LoopSettings
from schedules.automation import GUARD, drift_sensor, feedback_sensor, rollback_guard
from tests.test_sensors import engine, serve  # noqa: F401  (the fixture and the traffic writer)

SETTINGS = LoopSettings(feedback_threshold=20, guard_min_ratings=20, drift_window=50,
                        drift_reference=300, drift_cooldown_s=3600)


class Daemon:
    def __init__(self, instance, db, rng: random.Random, crash_rate: float):
        self.instance, self.rng, self.crash_rate = instance, rng, crash_rate
        self.resources = {"database": PostgresResource(), "embedder": EmbedderResource(),
                          "loop_settings": SETTINGS}
        self.engine = db
        self.cursors: dict[str, str | None] = {}
        self.advances: dict[str, list[tuple]] = {}  # sensor -> [(old cursor, new cursor)]
        self.submitted: dict[str, list[dict]] = {}  # sensor -> [{key, cursor}]
        self.keys: set[str] = set()
        self.crashes = 0
        self.served = registry.production(db).version

    def tick(self, sensor) -> None:
        name = sensor.name
        before = self.cursors.get(name)
        context = dg.build_sensor_context(instance=self.instance, cursor=before,
                                          resources=self.resources)
        result = sensor(context)
        requests = [result] if isinstance(result, dg.RunRequest) else []
        crash = self.rng.random() < self.crash_rate
        if not (crash and self.rng.random() < 0.5):  # a crash before the submit loses the requests
            for request in requests:
                self._submit(name, request, before)
        if crash:
            self.crashes += 1
            return
        if context.cursor != before:
            self.advances.setdefault(name, []).append((before, context.cursor))
        self.cursors[name] = context.cursor

    def _submit(self, sensor: str, request: dg.RunRequest, cursor) -> None:
        if request.run_key in self.keys:
            return  # Dagster skips a run key it has seen
        self.keys.add(request.run_key)
        self.submitted.setdefault(sensor, []).append({"key": request.run_key, "cursor": cursor})
        job = "rollback" if sensor == rollback_guard.name else "retrain"
        run = self.instance.create_run_for_job(job_def=defs.resolve_job_def(job),
                                               tags={**request.tags, "dagster/run_key": request.run_key})
        if job == "rollback":  # what serving_deployment does with rollback_from
            config = request.run_config["ops"]["serving_deployment"]["config"]
            registry.rollback(self.engine, actor=GUARD, reason=config["rollback_reason"],
                              expected=config["rollback_from"])
            self.served = registry.production(self.engine).version
        # It succeeds: a run that fails from outside its code is requested again (test_run_recovery.py).
        self.instance.report_dagster_event(
            dg.DagsterEvent(dg.DagsterEventType.RUN_SUCCESS.value, job_name=run.job_name), run.run_id)


def test_a_hundred_daemon_restarts_leave_one_run_per_decision(engine, instance):  # noqa: F811
    daemon = Daemon(instance, engine, random.Random(20261129), crash_rate=0.5)

    # Feedback: 100 ticks, with 0 to 10 counted negative ratings of the production model arriving
    # before each (so a re-evaluation after a crash often sees more rows than the one it repeats).
    for _ in range(100):
        arriving = daemon.rng.randint(0, 10)
        serve(engine, "v2", ["q"] * arriving, [-1] * arriving)
        daemon.tick(feedback_sensor)
    runs = daemon.submitted[feedback_sensor.name]
    starts = [r["cursor"] for r in runs]
    assert len(starts) == len(set(starts))  # one run per window start: never two for one decision
    for old, _new in daemon.advances[feedback_sensor.name]:
        assert old in starts  # the cursor never moved past a window without its run
    assert runs

    # The guard: v2 does much worse than v1 did; it decides once, the run rolls back, and v1
    # (back by an automatic rollback) is never rolled back automatically again.
    serve(engine, "v1", ["q"] * 40, [1] * 40)
    serve(engine, "v2", ["q"] * 40, [-1] * 30 + [1] * 10)
    for _ in range(40):
        daemon.tick(rollback_guard)
        if daemon.served == "v1":
            serve(engine, "v1", ["q"] * 5, [-1] * 5)  # now v1 does badly too
    assert len(daemon.submitted[rollback_guard.name]) == 1
    assert registry.production(engine).version == daemon.served == "v1"

    # Drift: 20 rounds of 50 off-topic prompts: one retrain, then the cooldown. (An instance
    # without the retrains above, which would already hold the cooldown.)
    reference = [e["prompt"] for e in generate_examples(n_rows=300, seed=5)]
    embeddings.store_embeddings(engine, "d1", list(range(1, 301)), reference,
                                EmbedderResource().embed(reference))
    with dg.instance_for_test() as fresh:
        drift = Daemon(fresh, engine, random.Random(7), crash_rate=0.5)
        for batch in range(20):
            serve(engine, "v1", [f"Tell me a pirate joke, number {batch * 50 + i}." for i in range(50)])
            for _ in range(4):
                drift.tick(drift_sensor)
        assert len(drift.submitted[drift_sensor.name]) == 1

    assert daemon.crashes + drift.crashes >= 100
