"""Sensors and the schedule that close the loop from production back to training.

The sensors are thin: they read production tables, call the pure decisions in the library, and
request runs with a run_key derived from what they saw, so a restarted daemon that evaluates the
same window again launches nothing twice.
"""

import json

import dagster as dg

from llmops_dagster.governance import registry
from llmops_dagster.loop import signals
from llmops_dagster.serving import traffic_log
from resources.database import PostgresResource
from resources.embedder import EmbedderResource
from resources.loop_settings import LoopSettings
from schedules.jobs import deploy_job, retrain_job


def nightly_retrain_schedule(timezone: str = "UTC") -> dg.ScheduleDefinition:
    """Retrain the training path every night at 02:00 in `timezone` (an IANA name)."""
    return dg.ScheduleDefinition(
        name="nightly_retrain", job=retrain_job, cron_schedule="0 2 * * *",
        execution_timezone=timezone, default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Nightly retraining of the training path.",
    )


@dg.sensor(job=retrain_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def feedback_sensor(context: dg.SensorEvaluationContext, database: PostgresResource,
                    loop_settings: LoopSettings):
    """Retrain when new counted negative feedback on the production model reaches the threshold.

    Only ratings that carry a credential count (an API key, or the feedback token of the answer),
    once per answer and rater. The cursor is a PostgreSQL snapshot: the window is every counted
    rating committed since, whatever its id, so a slow insert is neither missed nor counted twice.
    Below the threshold the cursor stays put (the rows keep counting); at the threshold it moves
    to the snapshot of this count, and the run key names the window.
    """
    engine = database.engine()
    production = registry.production(engine)
    if production is None:
        return dg.SkipReason("no model is in production yet")
    since = context.cursor if traffic_log.is_snapshot(context.cursor) else None
    window = traffic_log.new_negative_feedback(engine, since, production.version)
    if window.negative < loop_settings.feedback_threshold:
        return dg.SkipReason(f"{window.negative} new counted negative ratings on {production.version}; "
                             f"threshold {loop_settings.feedback_threshold}")
    context.update_cursor(window.until)
    return dg.RunRequest(
        run_key=f"feedback-{window.key}",
        tags={"llmops/trigger": "feedback", "llmops/negative_feedback": str(window.negative),
              "llmops/feedback_window": window.key},
    )


@dg.sensor(job=retrain_job, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.RUNNING)
def drift_sensor(context: dg.SensorEvaluationContext, database: PostgresResource,
                 embedder: EmbedderResource, loop_settings: LoopSettings):
    """Retrain when recent production prompts drift from the production model's training prompts
    (centroid cosine distance, permutation-calibrated to drift_alpha false alarms)."""
    engine = database.engine()
    production = registry.production(engine)
    if production is None:
        return dg.SkipReason("no model is in production yet")
    check = signals.check_production_drift(engine, embedder.embed, production,
                                           **loop_settings.drift_test(), tested_window=context.cursor)
    if check.result is None:
        return dg.SkipReason(check.reason)
    result, window_key = check.result, check.window_key
    context.update_cursor(window_key)
    context.log.info(f"drift statistic {result.statistic:.5f}, threshold {result.threshold:.5f}, "
                     f"p {result.p_value:.3f} ({result.recent} recent vs {result.reference} reference)")
    if not result.drifted:
        return dg.SkipReason(check.reason)
    return dg.RunRequest(
        run_key=f"drift-{window_key}",
        tags={"llmops/trigger": "drift", "llmops/drift": json.dumps(
            {"statistic": round(result.statistic, 6), "threshold": round(result.threshold, 6),
             "p_value": round(result.p_value, 4)})},
    )


@dg.sensor(job=deploy_job, minimum_interval_seconds=120, default_status=dg.DefaultSensorStatus.RUNNING)
def rollback_guard(context: dg.SensorEvaluationContext, database: PostgresResource,
                   loop_settings: LoopSettings):
    """Roll back (registry, then deployment) when the new production version's live negative rate
    exceeds the previous version's by more than the margin over enough ratings."""
    engine = database.engine()
    production = registry.production(engine)
    if production is None:
        return dg.SkipReason("no model is in production yet")
    previous = registry.previous_production(engine)
    if previous is None:
        return dg.SkipReason(f"{production.version} is the first production version")
    reason = signals.guard_verdict(traffic_log.live_rate(engine, production.version),
                                traffic_log.live_rate(engine, previous), loop_settings.guard_margin,
                                loop_settings.guard_min_ratings)
    if reason is None:
        return dg.SkipReason(f"{production.version} is doing no worse than {previous}")
    restored = registry.rollback(engine, actor="rollback_guard", reason=reason)
    return dg.RunRequest(run_key=f"rollback-{production.version}-to-{restored.version}",
                         tags={"llmops/trigger": "rollback_guard"})
