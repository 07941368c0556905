"""Sensors and the schedule that close the loop from production back to training.

The sensors are thin: they read production tables, call the pure decisions in the library, and
request runs with a run_key derived from what they saw, so a restarted daemon that evaluates the
same window again launches nothing twice. A decision whose runs all died outside their own code
(a dead run worker, after the daemon's retries) is requested again under a new key, a few times at
most (runs.next_request); one whose own code failed is not.
"""

import json
import time

import dagster as dg

from llmops_dagster.governance import registry
from llmops_dagster.loop import runs, signals
from llmops_dagster.serving import traffic_log
from resources.database import PostgresResource
from resources.embedder import EmbedderResource
from resources.loop_settings import RETRAIN_APPROVAL, LoopSettings
from resources.serving import RayServeResource
from schedules.jobs import RETRAIN_JOBS, SERVING_JOBS, deploy_job, retrain_job, rollback_job

GUARD = signals.GUARD
RECONCILE_RETRY_S = 600  # a failed reconciling deploy is requested again after this long


def skipped(context: dg.SensorEvaluationContext, reason: str) -> dg.SkipReason:
    """A tick's skip reason, also in the tick's log (the UI shows a SkipReason only on hover)."""
    context.log.info(reason)
    return dg.SkipReason(reason)


def nightly_retrain_schedule(timezone: str = "UTC") -> dg.ScheduleDefinition:
    """Retrain the training path every night at 02:00 in `timezone` (an IANA name); the new
    version is promoted only when it improves the complaint slice (require_improvement)."""
    return dg.ScheduleDefinition(
        name="nightly_retrain", job=retrain_job, cron_schedule="0 2 * * *",
        execution_timezone=timezone, default_status=dg.DefaultScheduleStatus.RUNNING,
        run_config={"ops": RETRAIN_APPROVAL},
        description="Nightly retraining of the training path; promoted only on improvement.",
    )


# Every 15 s: the trigger-to-served budget is a minute, and a tick costs ~14 ms at 1M ratings
# (benchmarks/bench_sensors.py).
@dg.sensor(job=retrain_job, minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING)
def feedback_sensor(context: dg.SensorEvaluationContext, database: PostgresResource,
                    loop_settings: LoopSettings):
    """Retrain when new counted negative feedback on the production model reaches the threshold.

    Only ratings that carry a credential count (an API key, or the feedback token of the answer),
    once per answer and rater, and by actor: at most max_votes_per_actor of one actor, from at
    least min_distinct_raters actors (traffic_log.new_negative_feedback). The cursor is a
    PostgreSQL snapshot: the window is every counted rating committed since, whatever its id, so a
    slow insert is neither missed nor counted twice.
    Below the threshold the cursor stays put (the rows keep counting); at the threshold it moves
    to the snapshot of this count, and the run key names the window.
    """
    engine = database.engine()
    production = registry.production(engine)
    if production is None:
        return skipped(context, "no model is in production yet")
    again = request_again(context, "feedback", loop_settings)
    if again is not None:
        return again
    since = context.cursor if traffic_log.is_snapshot(context.cursor) else None
    window = traffic_log.new_negative_feedback(engine, since, production.version,
                                               loop_settings.max_votes_per_actor)
    rule = (loop_settings.feedback_threshold, loop_settings.min_distinct_raters)
    if not window.reaches(*rule):
        return skipped(context, f"new on {production.version}: {window.summary(*rule)}")
    pending = runs.in_flight(context.instance, RETRAIN_JOBS)
    if pending:  # the rows keep counting; the next window starts after this retrain
        return skipped(context, f"{window.summary(*rule)}, but run {pending[0].run_id} "
                       f"({pending[0].job_name}) is queued or running")
    context.update_cursor(window.until)
    return dg.RunRequest(
        run_key=f"feedback-{window.key}",
        run_config=loop_settings.retrain_run_config(),
        tags={"llmops/trigger": "feedback", "llmops/negative_feedback": str(window.negative),
              "llmops/feedback_actors": str(window.actors),
              "llmops/feedback_window": window.key, runs.DECISION_TAG: f"feedback-{window.key}"},
    )


@dg.sensor(job=retrain_job, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.RUNNING)
def drift_sensor(context: dg.SensorEvaluationContext, database: PostgresResource,
                 embedder: EmbedderResource, loop_settings: LoopSettings):
    """Retrain when recent production prompts drift from the production model's training prompts
    (centroid cosine distance, permutation-calibrated to drift_alpha false alarms a test): one test
    per new window of prompts, never while a retrain is queued or running, and not within
    drift_cooldown_s of the last retrain."""
    engine = database.engine()
    production = registry.production(engine)
    if production is None:
        return skipped(context, "no model is in production yet")
    again = request_again(context, "drift", loop_settings)
    if again is not None:
        return again
    pending = runs.in_flight(context.instance, RETRAIN_JOBS)
    if pending:
        return skipped(context, f"run {pending[0].run_id} ({pending[0].job_name}) is queued or running")
    since_retrain = runs.seconds_since(runs.last_created(context.instance, "retrain"))
    if since_retrain is not None and since_retrain < loop_settings.drift_cooldown_s:
        return skipped(context, f"cooldown: the last retrain was {since_retrain:.0f} s ago "
                       f"(drift_cooldown_s {loop_settings.drift_cooldown_s})")
    check = signals.check_production_drift(engine, embedder.embed, production,
                                           **loop_settings.drift_test(), tested_window=context.cursor)
    if check.result is None:
        return skipped(context, check.reason)
    result, window_key = check.result, check.window_key
    context.update_cursor(window_key)
    context.log.info(f"drift statistic {result.statistic:.5f}, threshold {result.threshold:.5f}, "
                     f"p {result.p_value:.3f} ({result.recent} recent vs {result.reference} reference)")
    if not result.drifted:
        return skipped(context, check.reason)
    return dg.RunRequest(
        run_key=f"drift-{window_key}",
        run_config=loop_settings.retrain_run_config(),
        tags={"llmops/trigger": "drift", runs.DECISION_TAG: f"drift-{window_key}", "llmops/drift": json.dumps(
            {"statistic": round(result.statistic, 6), "threshold": round(result.threshold, 6),
             "p_value": round(result.p_value, 4)})},
    )


def request_again(context: dg.SensorEvaluationContext, trigger: str,
                  loop_settings: LoopSettings) -> dg.RunRequest | dg.SkipReason | None:
    """The request of `trigger`'s newest decision again when its runs were all lost to failures
    outside them (runs.next_request), under a new run key, once no retrain is queued or running;
    None when there is no such decision. The cursor stays: the decision's window was counted."""
    lost = runs.lost_decision(context.instance, trigger, loop_settings.max_requests_per_decision,
                              RETRAIN_JOBS)
    if lost is None:
        return None
    pending = runs.in_flight(context.instance, RETRAIN_JOBS)
    if pending:
        return skipped(context, f"{lost.decision} is to be requested again, but run {pending[0].run_id} "
                       f"({pending[0].job_name}) is queued or running")
    context.log.info(f"{lost.decision}: its runs failed outside their own code (a dead run worker); "
                     f"requesting it again ({lost.number + 1} of {loop_settings.max_requests_per_decision})")
    return lost.run_request()


@dg.sensor(job=rollback_job, minimum_interval_seconds=120, default_status=dg.DefaultSensorStatus.RUNNING)
def rollback_guard(context: dg.SensorEvaluationContext, database: PostgresResource,
                   loop_settings: LoopSettings):
    """Request a rollback run when the production version's live negative rate, since its
    promotion, exceeds the previous version's (over its own time in production) by more than the
    margin, over enough counted ratings of each.

    The sensor only decides; the `rollback` run changes the registry and redeploys, and its run
    key is the promotion being judged (its audit-log entry), so no decision is applied twice. A
    version that came back by an automatic rollback is not rolled back automatically again: that
    needs a person (`llmops models rollback --reason ...`)."""
    engine = database.engine()
    promotion = registry.current_promotion(engine)
    if promotion is None:
        return skipped(context, "no model is in production yet")
    previous = registry.previous_production(engine)
    if previous is None:
        return skipped(context, f"{promotion.version} has no previous version to roll back to")
    pending = runs.in_flight(context.instance, SERVING_JOBS)
    if pending:
        return skipped(context, f"run {pending[0].run_id} ({pending[0].job_name}) is queued or running")
    cap = loop_settings.max_votes_per_actor
    new = traffic_log.live_rate(engine, promotion.version, since=promotion.at, max_votes_per_actor=cap)
    old = traffic_log.live_rate(engine, previous, since=registry.promoted_at(engine, previous),
                                max_votes_per_actor=cap)
    reason = signals.guard_verdict(new, old, loop_settings.guard_margin, loop_settings.guard_min_ratings,
                                   loop_settings.min_distinct_raters)
    if reason is None:
        return skipped(context, f"{promotion.version} is doing no worse than {previous}")
    if promotion.by_rollback and promotion.actor == GUARD:
        context.log.warning(f"{reason}; {promotion.version} came back by an automatic rollback, "
                            "so another one needs a person")
        return skipped(context, f"needs a person: {reason}; {promotion.version} is production by an "
                       f"automatic rollback already (llmops models rollback --reason ...)")
    return dg.RunRequest(
        run_key=f"rollback-decision-{promotion.audit_id}",
        run_config={"ops": {"serving_deployment": {"config": {
            "rollback_from": promotion.version, "rollback_reason": reason}}}},
        tags={"llmops/trigger": GUARD, "llmops/rollback_from": promotion.version,
              "llmops/rollback_to": previous},
    )


@dg.sensor(job=deploy_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def serving_reconciler(context: dg.SensorEvaluationContext, database: PostgresResource,
                       ray_serve: RayServeResource):
    """Keep the served version equal to the registry's production version: when they differ (a
    failed deploy, a rollback by hand, a lost Ray head) and no run that serves is queued or
    running, request a deploy; a failed one is asked for again after RECONCILE_RETRY_S."""
    production = registry.production(database.engine())
    if production is None:
        return skipped(context, "no model is in production yet")
    served = ray_serve.served_version()
    if served == production.version:
        return skipped(context, f"serving {served}, the registry's production version")
    pending = runs.in_flight(context.instance, SERVING_JOBS)
    if pending:
        return skipped(context, f"run {pending[0].run_id} ({pending[0].job_name}) is queued or running")
    slot = int(time.time() // RECONCILE_RETRY_S)
    return dg.RunRequest(run_key=f"reconcile-{production.version}-from-{served or 'nothing'}-{slot}",
                         tags={"llmops/trigger": "reconcile", "llmops/served": served or "nothing"})
