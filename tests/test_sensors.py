"""The sensors against the real PostgreSQL and a real DagsterInstance: SkipReason below the
threshold, exactly one RunRequest when crossed, nothing twice with the same cursor or after a
daemon restart, drift on a new topic, and the post-deploy guard's rollback."""

import uuid

import dagster as dg
import pytest
import sqlalchemy as sa

from llmops_dagster.dataset import embeddings
from llmops_dagster.dataset.synthetic_data import generate_examples
from llmops_dagster.definitions import defs
from llmops_dagster.governance import registry
from llmops_dagster.infra import database
from llmops_dagster.serving import traffic_log
from resources.database import PostgresResource
from resources.embedder import EmbedderResource
from resources.loop_settings import LoopSettings
from resources.serving import RayServeResource
from schedules.automation import GUARD, drift_sensor, feedback_sensor, rollback_guard


@pytest.fixture
def engine(platform_db, monkeypatch):
    """A fresh database with two registered versions; v2 in production after v1."""
    url = database.ensure_database(platform_db.admin_url(), f"sensors_{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv("LLMOPS_DATABASE_URL", url)
    engine = PostgresResource().engine()
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO dataset_versions (version, input_hash, source, path, rows_input, rows_accepted, "
            "rows_quarantined) VALUES ('d1', 'h', 'synthetic', '/nowhere', 1, 1, 0)"))
    for version in ("v1", "v2"):
        registry.register_candidate(
            engine, version=version, dataset_version="d1", prompt_set_version="p1",
            base_model_version="b1", checkpoint_path="-", adapter_path="-", merged_model_path="-",
            train_config={}, eval_report_id=None)
        registry.promote(engine, version, actor="test", reason="setup")
    return engine


def serve(engine, version: str, prompts: list[str], ratings: list[int] | None = None,
          counted: bool = True, actor: str | None = None) -> None:
    """Rows as the serving app writes them: a request log entry each, and a rating when given
    (counted: as sent with the answer's feedback token; not counted: as sent with no credential),
    each from an actor of its own unless `actor` names the one behind them all."""
    with engine.begin() as connection:
        for index, prompt in enumerate(prompts):
            response_id = str(uuid.uuid4())
            connection.execute(sa.text(
                "INSERT INTO request_log (response_id, model_version, prompt, response, max_new_tokens, "
                "latency_ms) VALUES (:id, :v, :p, 'answer', 8, 1.0)"), {"id": response_id, "v": version,
                                                                       "p": prompt})
            if ratings is not None:
                connection.execute(sa.text(
                    "INSERT INTO feedback (response_id, client_id, rating, rater, credential, counted, "
                    "actor) VALUES (:id, 'c', :r, :rater, :credential, :counted, :actor)"),
                    {"id": response_id, "r": ratings[index], "counted": counted,
                     "actor": actor or f"key:person-{uuid.uuid4().hex[:8]}",
                     "rater": f"token:{response_id}" if counted else "anonymous",
                     "credential": "feedback_token" if counted else "none"})


def evaluate(sensor, instance, cursor=None, **settings):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={
        "database": PostgresResource(), "embedder": EmbedderResource(),
        "loop_settings": LoopSettings(**settings)})
    return sensor(context), context.cursor


def test_feedback_sensor_counts_every_row_once(engine, instance):
    serve(engine, "v1", ["old model"] * 5, [-1] * 5)  # not the production model: never counted
    serve(engine, "v2", ["q"] * 30, [-1] * 30, counted=False)  # no credential: stored, never counted
    serve(engine, "v2", ["q"] * 19, [-1] * 19)
    result, cursor = evaluate(feedback_sensor, instance)
    assert isinstance(result, dg.SkipReason) and "19 counted negative votes" in result.skip_message
    assert cursor is None  # below the threshold the rows keep counting

    serve(engine, "v2", ["q"] * 3, [1, 1, -1])
    result, cursor = evaluate(feedback_sensor, instance)
    assert isinstance(result, dg.RunRequest) and result.tags["llmops/negative_feedback"] == "20"
    assert traffic_log.is_snapshot(cursor)

    again, same_cursor = evaluate(feedback_sensor, instance, cursor=cursor)
    assert isinstance(again, dg.SkipReason) and same_cursor == cursor
    # A daemon restarted before its cursor was saved sees the same rows: the same run_key, which
    # Dagster never launches twice (the snapshot moved with other transactions; the key did not).
    with engine.begin() as connection:
        connection.execute(sa.text("SELECT pg_current_xact_id()"))  # another transaction meanwhile
    restarted, _ = evaluate(feedback_sensor, instance, cursor=None)
    assert restarted.run_key == result.run_key

    serve(engine, "v2", ["q"] * 20, [-1] * 20)
    following, next_cursor = evaluate(feedback_sensor, instance, cursor=cursor)
    assert following.tags["llmops/negative_feedback"] == "20" and following.run_key != result.run_key
    assert next_cursor != cursor


def test_a_rating_committed_late_is_counted_by_the_sensor_exactly_once(engine, instance):
    """A counted rating whose insert took a lower id but committed after 20 later ones is not in
    the window those 20 fire, and is counted by the next window, once."""
    serve(engine, "v2", ["early"])
    held = engine.connect()
    transaction = held.begin()
    response_id = held.execute(sa.text("SELECT response_id FROM request_log LIMIT 1")).scalar_one()
    held_id = held.execute(sa.text(
        "INSERT INTO feedback (response_id, client_id, rating, rater, credential, counted) "
        "VALUES (:id, 'held', -1, 'token:held', 'feedback_token', true) RETURNING id"),
        {"id": response_id}).scalar_one()
    serve(engine, "v2", ["q"] * 20, [-1] * 20)  # ids above held_id, committed first
    fired, cursor = evaluate(feedback_sensor, instance)
    assert fired.tags["llmops/negative_feedback"] == "20"
    transaction.commit()
    held.close()
    serve(engine, "v2", ["q"], [-1])  # one more actor beside the held row's
    late, cursor = evaluate(feedback_sensor, instance, cursor=cursor, feedback_threshold=2,
                            min_distinct_raters=2)
    assert isinstance(late, dg.RunRequest) and late.tags["llmops/negative_feedback"] == "2"
    window = traffic_log.new_negative_feedback(engine, None, "v2")
    assert window.negative == 22 and window.newest_id > held_id
    again, _ = evaluate(feedback_sensor, instance, cursor=cursor, feedback_threshold=1)
    assert isinstance(again, dg.SkipReason) and "0 counted negative votes" in again.skip_message


def test_one_actor_is_one_vote_however_many_tokens_it_holds(engine, instance):
    """30 down-votes from one host's feedback tokens (one actor) request nothing; capped at 3 an
    actor, 6 actors with 4 each are 18 votes, below 20; a 7th actor's 3 make 21 from 7: a run.
    Every rating stays stored."""
    serve(engine, "v2", ["q"] * 30, [-1] * 30, actor="host:loopback")
    result, cursor = evaluate(feedback_sensor, instance)
    assert isinstance(result, dg.SkipReason) and cursor is None
    assert "3 counted negative votes from 1 actor(s) (30 stored ratings" in result.skip_message
    one_actor = traffic_log.new_negative_feedback(engine, None, "v2", max_votes_per_actor=1000)
    assert (one_actor.negative, one_actor.actors) == (30, 1)
    lone = evaluate(feedback_sensor, instance, feedback_threshold=3, max_votes_per_actor=100)[0]
    assert isinstance(lone, dg.SkipReason)  # 30 votes, but one actor never asks alone

    for person in range(5):
        serve(engine, "v2", ["q"] * 4, [-1] * 4, actor=f"key:person-{person}")
    result, _ = evaluate(feedback_sensor, instance)
    assert isinstance(result, dg.SkipReason)
    assert "18 counted negative votes from 6 actor(s)" in result.skip_message
    serve(engine, "v2", ["q"] * 3, [-1] * 3, actor="key:person-6")
    result, _ = evaluate(feedback_sensor, instance)
    assert isinstance(result, dg.RunRequest)
    assert (result.tags["llmops/negative_feedback"], result.tags["llmops/feedback_actors"]) == ("21", "7")
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM feedback")).scalar_one() == 53


def test_one_actor_cannot_roll_a_version_back(engine, instance):
    """v3's 20 down-votes from one key weigh 3 ratings and one actor: the guard does not judge."""
    registry.register_candidate(
        engine, version="v3", dataset_version="d1", prompt_set_version="p1", base_model_version="b1",
        checkpoint_path="-", adapter_path="-", merged_model_path="-", train_config={},
        eval_report_id=None)
    registry.promote(engine, "v3", actor="policy", reason="passed", automatic=True)
    serve(engine, "v2", ["q"] * 20, [1] * 20)
    serve(engine, "v3", ["q"] * 20, [-1] * 20, actor="key:mallory")
    live = traffic_log.live_rate(engine, "v3")
    assert (live.ratings, live.negative, live.actors) == (3, 3.0, 1)
    result, _ = evaluate(rollback_guard, instance, guard_min_ratings=3)
    assert isinstance(result, dg.SkipReason) and registry.production(engine).version == "v3"


def test_drift_sensor_fires_on_a_new_topic_only(engine, instance):
    examples = generate_examples(n_rows=400, seed=5)
    reference = [e["prompt"] for e in examples[:300]]
    embedder = EmbedderResource()
    embeddings.store_embeddings(engine, "d1", list(range(1, 301)), reference, embedder.embed(reference))
    settings = {"drift_window": 60, "drift_reference": 300}

    serve(engine, "v2", [e["prompt"] for e in examples[300:360]])
    result, cursor = evaluate(drift_sensor, instance, **settings)
    assert isinstance(result, dg.SkipReason) and "no drift" in result.skip_message

    # The next test waits for a whole new window: 40 new prompts are not one.
    serve(engine, "v2", [e["prompt"] for e in examples[360:400]])
    waiting, same = evaluate(drift_sensor, instance, cursor=cursor, **settings)
    assert isinstance(waiting, dg.SkipReason) and "40 new prompts" in waiting.skip_message
    assert same == cursor

    topics = ["Can you recommend a good pasta recipe for dinner?", "What is the capital of Peru?",
              "Explain how photosynthesis works.", "Who won the football match yesterday?"]
    serve(engine, "v2", [topics[i % 4] + f" ({i})" for i in range(20)])  # a third of the new window
    result, cursor = evaluate(drift_sensor, instance, cursor=cursor, **settings)
    assert isinstance(result, dg.RunRequest) and result.run_key.startswith("drift-v2@")
    assert "statistic" in result.tags["llmops/drift"]
    again, _ = evaluate(drift_sensor, instance, cursor=cursor, **settings)
    assert isinstance(again, dg.SkipReason) and "0 new prompts" in again.skip_message


def test_a_drift_storm_retrains_at_most_once_in_the_cooldown(engine, instance):
    """1,000 off-topic prompts, the sensor evaluated after every 50: one retrain request, then
    nothing while that retrain is queued, and nothing in the cooldown after it."""
    reference = [e["prompt"] for e in generate_examples(n_rows=300, seed=5)]
    embeddings.store_embeddings(engine, "d1", list(range(1, 301)), reference,
                                EmbedderResource().embed(reference))
    settings = {"drift_window": 50, "drift_reference": 300}
    requested, skipped, cursor, run = [], [], None, None
    for batch in range(20):
        serve(engine, "v2", [f"Tell me a joke about pirates, number {batch * 50 + i}." for i in range(50)])
        result, cursor = evaluate(drift_sensor, instance, cursor=cursor, **settings)
        if isinstance(result, dg.RunRequest):
            requested.append(result)
            # The daemon queues it: a retrain run now exists for this instance.
            run = instance.create_run_for_job(job_def=defs.resolve_job_def("retrain"),
                                              tags={"dagster/run_key": result.run_key})
        else:
            skipped.append(result.skip_message)
        if batch == 4 and run is not None:
            instance.report_run_failed(run)  # the retrain is over (the cooldown counts any outcome)
    assert len(requested) == 1
    assert any("queued or running" in m for m in skipped[:4]) and "cooldown" in skipped[-1]


def test_rollback_guard_decides_once_and_a_flip_flop_needs_a_person(engine, instance):
    """The guard only decides: its rollback is applied by a run (here, as that run does), under a
    run key naming the promotion judged, so a restarted daemon asks for the same run and a retried
    run changes nothing. A version that came back by an automatic rollback is not rolled back
    automatically again, and a rolled-back version is never promoted again by the policy."""
    registry.register_candidate(
        engine, version="v3", dataset_version="d1", prompt_set_version="p1", base_model_version="b1",
        checkpoint_path="-", adapter_path="-", merged_model_path="-", train_config={},
        eval_report_id=None)
    registry.promote(engine, "v3", actor="policy", reason="passed", automatic=True)
    serve(engine, "v2", ["q"] * 20, [-1] * 2 + [1] * 18)  # v2 did well in production
    serve(engine, "v3", ["q"] * 10, [-1] * 5 + [1] * 5)
    result, _ = evaluate(rollback_guard, instance, guard_min_ratings=20)
    assert isinstance(result, dg.SkipReason)  # too few ratings of v3 to judge
    serve(engine, "v3", ["q"] * 10, [-1] * 5 + [1] * 5)
    result, _ = evaluate(rollback_guard, instance, guard_min_ratings=20)
    promotion = registry.current_promotion(engine)
    assert isinstance(result, dg.RunRequest) and result.run_key == f"rollback-decision-{promotion.audit_id}"
    assert result.run_config["ops"]["serving_deployment"]["config"]["rollback_from"] == "v3"
    assert registry.production(engine).version == "v3"  # the sensor changed nothing
    restarted, _ = evaluate(rollback_guard, instance, guard_min_ratings=20)
    assert restarted.run_key == result.run_key

    reason = result.run_config["ops"]["serving_deployment"]["config"]["rollback_reason"]
    assert "50.0% over 20 ratings" in reason
    for _attempt in range(2):  # the run, and a retry of it: applied once
        registry.rollback(engine, actor=GUARD, reason=reason, expected="v3")
    assert registry.production(engine).version == "v2"
    assert [e["to_stage"] for e in registry.audit_log(engine, "v3")].count("archived") == 1

    # v2 now does badly too: a second automatic rollback in a row needs a person.
    serve(engine, "v1", ["q"] * 20, [1] * 20)
    serve(engine, "v2", ["q"] * 20, [-1] * 15 + [1] * 5)
    held, _ = evaluate(rollback_guard, instance, guard_min_ratings=20)
    assert isinstance(held, dg.SkipReason) and held.skip_message.startswith("needs a person")
    # The policy never brings back the version the guard took out; a person can, with a reason.
    with pytest.raises(registry.RegistryError, match="only a person"):
        registry.promote(engine, "v3", actor="policy", reason="retrained", automatic=True)
    registry.promote(engine, "v3", actor="alice", reason="fixed upstream data")
    assert registry.production(engine).version == "v3"
    # ... and a rollback never restores a version a rollback took out: from v2, back to v1.
    registry.rollback(engine, actor="alice", reason="still bad")
    assert registry.production(engine).version == "v2"
    assert registry.previous_production(engine) == "v1"


def test_production_traffic_is_observed_and_drift_is_materialized_on_demand(engine, instance):
    """The loop's assets: production_traffic's data version moves with new answers and ratings;
    production_drift runs the drift sensor's test and records its verdict."""
    from assets.feedback import production_drift, production_traffic

    resources = {"database": PostgresResource(), "embedder": EmbedderResource(),
                 "loop_settings": LoopSettings(drift_window=60, drift_reference=300)}

    observe = dg.Definitions(assets=[production_traffic], resources=resources
                             ).resolve_implicit_global_asset_job_def()  # as the UI's "Observe"

    def observed_version() -> str:
        assert observe.execute_in_process(instance=instance,
                                          asset_selection=[dg.AssetKey("production_traffic")]).success
        record = instance.fetch_observations(dg.AssetKey("production_traffic"), limit=1).records[0]
        return record.asset_observation.tags["dagster/data_version"]

    assert observed_version() == "answers-0-ratings-0"
    serve(engine, "v2", ["q"] * 3, [1, -1, 1])
    assert observed_version() == "answers-3-ratings-3"

    examples = generate_examples(n_rows=400, seed=5)
    reference = [e["prompt"] for e in examples[:300]]
    embeddings.store_embeddings(engine, "d1", list(range(1, 301)), reference,
                                EmbedderResource().embed(reference))
    serve(engine, "v2", [e["prompt"] for e in examples[300:360]])
    result = dg.materialize([production_drift], instance=instance, resources=resources)
    [event] = result.asset_materializations_for_node("production_drift")
    assert event.metadata["verdict"].value.startswith("no drift: statistic")
    assert event.metadata["drifted"].value is False and event.metadata["model_version"].value == "v2"


def test_a_rating_committed_late_is_curated_exactly_once(engine):
    """A rating whose insert took a lower id but committed after later ones is curated by the next
    curation, once: curation selects rows not yet curated, not "id above the highest curated"."""
    from llmops_dagster.feedback import curation

    serve(engine, "v2", ["early"])
    held = engine.connect()  # a rating in a transaction that stays open while others commit
    transaction = held.begin()
    response_id = held.execute(sa.text("SELECT response_id FROM request_log LIMIT 1")).scalar_one()
    held_id = held.execute(sa.text(
        "INSERT INTO feedback (response_id, client_id, rating) VALUES (:id, 'held', -1) RETURNING id"),
        {"id": response_id}).scalar_one()
    serve(engine, "v2", ["q"] * 3, [-1, -1, -1])  # ids above held_id, committed first

    def curate() -> list[int]:
        rows = traffic_log.uncurated_feedback(engine, limit=100)
        curation.store_curated(engine, rows, [[0.0] * 384 for _ in range(len(rows))])
        return sorted(rows["feedback_id"].astype(int))

    first = curate()
    assert len(first) == 3 and min(first) > held_id
    transaction.commit()
    held.close()
    assert curate() == [held_id]
    assert curate() == []
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM curated_feedback")).scalar_one() == 4


def test_serving_reconciler_deploys_when_registry_and_serve_disagree(engine, instance):
    """Nothing answers where Serve should be (a lost head, a failed deploy): a deploy is requested,
    once per retry period; not while a run that serves is queued or running."""
    from resources.serving import RayServeResource
    from schedules.automation import serving_reconciler

    def reconcile():
        context = dg.build_sensor_context(instance=instance, resources={
            "database": PostgresResource(), "ray_serve": RayServeResource(http_port=9)})
        return serving_reconciler(context)

    request = reconcile()
    assert isinstance(request, dg.RunRequest) and request.run_key.startswith("reconcile-v2-from-nothing-")
    assert reconcile().run_key == request.run_key  # the same decision in this retry period
    instance.create_run_for_job(job_def=defs.resolve_job_def("rollback"))
    waiting = reconcile()
    assert isinstance(waiting, dg.SkipReason) and "queued or running" in waiting.skip_message


def test_a_skipped_tick_says_why_in_its_log(engine, instance, capfd):
    """The UI shows a SkipReason only on hover: each sensor also logs it in the tick's log."""
    from schedules.automation import serving_reconciler

    instance.create_run_for_job(job_def=defs.resolve_job_def("rollback"))
    context = dg.build_sensor_context(instance=instance, resources={
        "database": PostgresResource(), "ray_serve": RayServeResource(http_port=9)})
    skipped = serving_reconciler(context)
    assert isinstance(skipped, dg.SkipReason) and "queued or running" in skipped.skip_message
    logged = capfd.readouterr().err  # the tick's logger (dagster's handler) writes to stderr
    assert f"dagster - INFO - {skipped.skip_message}" in logged, logged


def test_production_traffic_is_observed_every_minute_by_the_daemon(engine, instance):
    """The traffic_observation sensor (on by default, every minute) records production_traffic's
    data version when answers or ratings arrived, so it is there without a click; not otherwise."""
    from schedules.observation import traffic_observation

    sensor = defs.resolve_sensor_def("traffic_observation")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING and sensor.minimum_interval_seconds == 60
    key = dg.AssetKey("production_traffic")
    cursor = None

    def tick():
        nonlocal cursor
        context = dg.build_sensor_context(instance=instance, cursor=cursor,
                                          resources={"database": PostgresResource()})
        result = traffic_observation(context)
        cursor = context.cursor
        if isinstance(result, dg.SkipReason):
            return result
        for event in result.asset_events:  # as the daemon records a tick's asset events
            instance.report_runless_asset_event(event)
        return result

    def current_version() -> str:
        record = instance.fetch_observations(key, limit=1).records[0]
        return record.asset_observation.tags["dagster/data_version"]

    tick()
    assert current_version() == "answers-0-ratings-0"
    assert tick().skip_message == "production_traffic unchanged: answers-0-ratings-0"
    serve(engine, "v2", ["q"] * 2, [1, -1])
    [observation] = tick().asset_events
    assert current_version() == "answers-2-ratings-2" and observation.metadata["ratings"].value == 2
    record = instance.get_latest_data_version_record(key, is_source=True)  # what the UI shows
    assert record.asset_observation.tags["dagster/data_version"] == "answers-2-ratings-2"
