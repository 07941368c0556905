"""Observation of what is written outside Dagster: production_traffic's data version, recorded by a
sensor every minute, so the UI shows it without anyone clicking Observe."""

import dagster as dg

from assets.feedback import traffic_observation as observe_traffic
from llmops_dagster.infra.lineage import DATA_VERSION_TAG
from resources.database import PostgresResource
from schedules.automation import skipped


# In the sensor, not in a run: an observation is one query of two counts, while a run worker
# imports torch and transformers (10-30 s on 2 cores) and holds one of the two run slots.
@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def traffic_observation(context: dg.SensorEvaluationContext, database: PostgresResource):
    """Observe production_traffic every minute; an observation is recorded when its data version
    (answers and ratings logged) moved since the last one (the cursor)."""
    result = observe_traffic(database.engine())
    version = result.data_version.value
    if version == context.cursor:
        return skipped(context, f"production_traffic unchanged: {version}")
    context.update_cursor(version)
    context.log.info(f"production_traffic observed: {version}")
    return dg.SensorResult(asset_events=[dg.AssetObservation(
        asset_key=result.asset_key, metadata=result.metadata, tags={DATA_VERSION_TAG: version})])
