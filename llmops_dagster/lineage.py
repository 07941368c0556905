"""Finding the product an upstream asset last materialized (its version, path and counts)."""

from __future__ import annotations

import dagster as dg


def latest_metadata(context: dg.AssetExecutionContext, asset: dg.AssetsDefinition | dg.AssetKey,
                    ) -> dict:
    """Metadata values of the latest materialization of `asset`; a clear error when there is none."""
    key = asset if isinstance(asset, dg.AssetKey) else asset.key
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        raise dg.Failure(
            f"{key.to_user_string()} has never been materialized; materialize it first "
            f"(or select it in the same run)"
        )
    return {name: value.value for name, value in event.asset_materialization.metadata.items()}


def failed_checks(context: dg.AssetExecutionContext, checks: list[dg.AssetCheckKey]) -> list[str]:
    """The checks among `checks` whose latest execution did not succeed (or never ran)."""
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

    latest = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(checks)
    failed = []
    for key in checks:
        record = latest.get(key)
        if record is None or record.status != AssetCheckExecutionRecordStatus.SUCCEEDED:
            status = "never ran" if record is None else record.status.value.lower()
            failed.append(f"{key.asset_key.to_user_string()}:{key.name} ({status})")
    return failed
