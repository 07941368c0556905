"""Sensor cost as production tables grow, and the drift statistic's cost.

1. feedback_sensor evaluated against a real PostgreSQL holding 10,000 and then 1,000,000 request
   and feedback rows (the cursor 100 rows behind the newest, as in steady operation), median of 20
   evaluations each. Goal: ratio 1M / 10k at most 1.5, and under 1 s at 1M.
2. drift_test on 10,000 recent against 10,000 reference vectors of 384 dimensions, 200 permutations.
   Goal: under 2 s.

    python benchmarks/bench_sensors.py
"""

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import sqlalchemy as sa
from results import record


def fill(engine: sa.Engine, start: int, stop: int) -> None:
    """Rows start..stop-1 of request_log and feedback for the production model, one in 3 negative,
    each rating counted (as sent with its answer's feedback token); then the statistics autovacuum
    would gather, as the tables' owner (ANALYZE by another role is skipped with a warning)."""
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO request_log (response_id, model_version, prompt, response, max_new_tokens, "
            "latency_ms) SELECT md5(i::text)::uuid, 'v1', 'prompt ' || i, 'answer', 8, 1.0 "
            "FROM generate_series(:a, :b) AS i"), {"a": start, "b": stop - 1})
        connection.execute(sa.text(
            "INSERT INTO feedback (response_id, client_id, rating, rater, credential, counted) "
            "SELECT md5(i::text)::uuid, 'c', CASE WHEN i % 3 = 0 THEN -1 ELSE 1 END, "
            "'token:' || i, 'feedback_token', true FROM generate_series(:a, :b) AS i"),
            {"a": start, "b": stop - 1})
    from resources.database import PostgresResource

    owner = sa.create_engine(PostgresResource().owner_url())
    try:
        with owner.begin() as connection:  # statistics are transactional: committed
            connection.execute(sa.text("ANALYZE request_log; ANALYZE feedback"))
    finally:
        owner.dispose()


def snapshot(engine: sa.Engine) -> str:
    with engine.connect() as connection:
        return connection.execute(sa.text("SELECT pg_current_snapshot()::text")).scalar_one()


def time_sensor(engine: sa.Engine, instance, cursor: str) -> float:
    from resources.database import PostgresResource
    from resources.embedder import EmbedderResource
    from resources.loop_settings import LoopSettings
    from schedules.automation import feedback_sensor

    times = []
    for _ in range(20):
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={
            "database": PostgresResource(), "embedder": EmbedderResource(),
            "loop_settings": LoopSettings(feedback_threshold=10**9)})
        started = time.perf_counter()
        feedback_sensor(context)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="llmops-bench-"))
    os.environ["LLMOPS_HOME"] = str(home)
    from llmops_dagster.governance import registry
    from llmops_dagster.infra import database
    from resources.database import PostgresResource

    try:
        engine = PostgresResource().engine()
        registry.register_candidate(engine, version="v1", dataset_version="d", prompt_set_version="p",
                                    base_model_version="b", checkpoint_path="-", adapter_path="-",
                                    merged_model_path="-", train_config={}, eval_report_id=None)
        registry.promote(engine, "v1", actor="bench", reason="bench")
        with dg.instance_for_test() as instance:
            # The cursor (a snapshot) 100 rows behind the newest, as in steady operation.
            fill(engine, 1, 9_901)
            cursor = snapshot(engine)
            fill(engine, 9_901, 10_001)
            small = time_sensor(engine, instance, cursor)
            fill(engine, 10_001, 999_901)
            cursor = snapshot(engine)
            fill(engine, 999_901, 1_000_001)
            large = time_sensor(engine, instance, cursor)
    finally:
        database.stop_embedded_server(home / "pg")
        shutil.rmtree(home, ignore_errors=True)

    from llmops_dagster.loop.drift import drift_test

    rng = np.random.default_rng(0)
    recent, reference = (rng.normal(size=(10_000, 384)).astype(np.float32) for _ in range(2))
    drift_test(recent[:100], reference[:100])  # warm-up (imports, BLAS threads)
    started = time.perf_counter()
    drift_test(recent, reference, permutations=200)
    drift_seconds = time.perf_counter() - started

    print("feedback_sensor evaluation (median of 20), real PostgreSQL")
    print(f"  10,000 request + feedback rows      {small * 1000:8.1f} ms")
    print(f"  1,000,000 request + feedback rows   {large * 1000:8.1f} ms")
    print(f"  ratio 1M/10k: {large / small:.2f} (goal: at most 1.5; under 1 s at 1M: "
          f"{'yes' if large < 1 else 'no'})")
    print(f"drift statistic, 10k vs 10k vectors of 384 dimensions, 200 permutations: "
          f"{drift_seconds:.2f} s (goal: under 2 s)")
    record("sensors", "feedback_sensor tick at 1M rows / at 10k", large / small, "", "at most 1.5",
           large / small <= 1.5)
    record("sensors", "feedback_sensor tick at 1M rows", large * 1000, "ms", "under 1000 ms", large < 1)
    record("sensors", "drift statistic, 10k vs 10k, 200 permutations", drift_seconds, "s", "under 2 s",
           drift_seconds < 2)


if __name__ == "__main__":
    main()
