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
