"""Lineage in the Dagster instance: the product an upstream asset last materialized, the exact
materialization that carries a given data version, links to it in the Dagster UI, and the code
version of each lifecycle stage.

Every product's data version is its content hash (dataset, prompt set, base model, fine-tune) or its
registry id (eval report), so the registry's lineage columns name upstream materializations exactly:
`materialization_links` turns them into links an analyst clicks in the UI.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import quote

import dagster as dg

REPO_ROOT = Path(__file__).resolve().parents[2]  # the repository: assets/, llmops_dagster/
DATA_VERSION_TAG = "dagster/data_version"
# Materializations searched for a data version, newest first, a page at a time, to the oldest
# that carries it (the one that made it); 1000 covers months of nightly retrains.
SEARCH_LIMIT = 1000
SEARCH_PAGE = 50
# Metadata entry in which a materialization says whether it reused a product made earlier (True: the
# same data version, nothing made; False: it made it). A link to a product opens the one that made it.
REUSED = "reused"


@dataclass(frozen=True)
class UpstreamProduct:
    """The product of an upstream asset that an asset builds on: its data version, where that
    version was taken from, and the metadata of the materialization that made it."""

    asset: str
    version: str
    source: str
    metadata: dict


def upstream_product(context: dg.AssetExecutionContext, asset: dg.AssetsDefinition | dg.AssetKey,
                     required: bool = True) -> UpstreamProduct | None:
    """The product of `asset` this asset builds on: the one this run materialized when the run
    includes `asset` (so two concurrent runs never mix products), else the version Dagster records
    as `asset`'s current data version (logged, with the run that made it); when there is neither,
    a dg.Failure naming `asset`, or None (logged) for an input that is not `required`."""
    key = asset if isinstance(asset, dg.AssetKey) else asset.key
    name = key.to_user_string()
    materialization = _materialized_in_run(context, key)
    source = f"materialized in this run ({context.run_id[:8]})"
    if materialization is None:
        event = context.instance.get_latest_materialization_event(key)
        materialization = event.asset_materialization if event is not None else None
        if event is not None:
            source = f"Dagster's current data version of {name} (run {event.run_id[:8]})"
    version = materialization.tags.get(DATA_VERSION_TAG) if materialization is not None else None
    if (materialization is None or version is None) and not required:
        context.log.info(f"{name} was never materialized: this asset builds without it")
        return None
    if materialization is None or version is None:
        raise dg.Failure(
            f"{name} has no data version to build on: it was not materialized in this run and has "
            f"never been materialized; materialize it first (or select it in the same run)"
        )
    if not source.startswith("materialized in this run"):
        context.log.info(f"{name} was not materialized in this run: using {version}, {source}")
    metadata = {entry: value.value for entry, value in materialization.metadata.items()}
    return UpstreamProduct(asset=name, version=version, source=source, metadata=metadata)


def upstream_record(context: dg.AssetExecutionContext, asset: dg.AssetsDefinition, engine, read):
    """The typed record of `asset`'s product this asset builds on (`upstream_product`'s version),
    read from its version table by `read(connection, version)` (the table owner's reader, None when
    the version is not recorded); a dg.Failure naming the asset and version when it is not."""
    product = upstream_product(context, asset)
    with engine.connect() as connection:
        record = read(connection, product.version)
    if record is None:
        raise dg.Failure(
            f"{product.asset} {product.version} ({product.source}) is not recorded in the platform "
            f"database: materialize {product.asset} again against this database"
        )
    return record


def _materialized_in_run(context: dg.AssetExecutionContext, key: dg.AssetKey):
    """The newest materialization of `key` in this run, or None (one query on the run's events)."""
    records = context.instance.get_records_for_run(
        context.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, ascending=False).records
    for record in records:
        materialization = record.asset_materialization
        if materialization is not None and materialization.asset_key == key:
            return materialization
    return None


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


def find_materialization(instance: dg.DagsterInstance, asset: str, data_version: str):
    """The materialization of `asset` that made data version `data_version`, or None: the newest
    whose metadata says it made the product (REUSED false), else the oldest with that version (a
    later one with the same version recomputed the same content, or reused it)."""
    cursor, searched, oldest, oldest_not_reused = None, 0, None, None
    while searched < SEARCH_LIMIT:
        page = instance.fetch_materializations(dg.AssetKey(asset), limit=SEARCH_PAGE, cursor=cursor)
        for record in page.records:
            materialization = record.asset_materialization
            if materialization is None or materialization.tags.get(DATA_VERSION_TAG) != data_version:
                continue
            reused = materialization.metadata.get(REUSED)
            if reused is not None and reused.value is False:
                return record
            oldest = record
            if reused is None:
                oldest_not_reused = record
        if not page.has_more:
            break
        cursor, searched = page.cursor, searched + len(page.records)
    return oldest_not_reused or oldest


def event_path(asset: str, timestamp_s: float) -> str:
    """Path of one materialization in the Dagster UI: the asset's events tab at that event."""
    return f"/assets/{quote(asset)}?view=events&time={int(round(timestamp_s * 1000))}"


def materialization_links(instance: dg.DagsterInstance, versions: dict[str, str],
                          base_url: str = "") -> dict[str, dict]:
    """For each asset -> data version: the run and a UI link of the materialization that made it
    ({} values where this instance never materialized that version)."""
    links = {}
    for asset, version in versions.items():
        record = find_materialization(instance, asset, version)
        links[asset] = {} if record is None else {
            "data_version": version, "run_id": record.run_id, "timestamp": record.timestamp,
            "url": base_url.rstrip("/") + event_path(asset, record.timestamp),
            "run_url": f"{base_url.rstrip('/')}/runs/{record.run_id}",
        }
    return links


def lineage_metadata(instance: dg.DagsterInstance, versions: dict[str, str]) -> dict:
    """Metadata entries "upstream/<asset>": a link to the exact materialization of each upstream
    product (relative to the UI, so it works wherever the webserver is served), and a table."""
    links = materialization_links(instance, versions)
    metadata: dict = {}
    rows = ["| product | data version | run |", "|---|---|---|"]
    for asset, link in links.items():
        if link:
            metadata[f"upstream/{asset}"] = dg.MetadataValue.url(link["url"])
            rows.append(f"| [{asset}]({link['url']}) | `{link['data_version']}` | "
                        f"[{link['run_id'][:8]}]({link['run_url']}) |")
        else:
            rows.append(f"| {asset} | `{versions[asset]}` | not materialized in this instance |")
    metadata["lineage"] = dg.MetadataValue.md("\n".join(rows))
    return metadata


def model_lineage_versions(engine, model) -> dict[str, str]:
    """Data versions of every product behind a registered model version, from the registry and the
    dataset table (dataset_store): the served answer's whole chain back to the raw snapshot."""
    from llmops_dagster.dataset import dataset_store

    input_hash = dataset_store.input_hash_of(engine, model.dataset_version)
    versions = {"approved_model": model.version, "finetuned_checkpoint": model.version}
    if model.eval_report_id is not None:
        versions["eval_report"] = eval_report_version(model.eval_report_id)
    versions.update({"base_model": model.base_model_version, "prompt_set": model.prompt_set_version,
                     "validated_dataset": model.dataset_version})
    if input_hash:
        versions["raw_examples"] = input_hash
    return versions


EVAL_REPORT_PREFIX = "report-"


def eval_report_version(report_id: int) -> str:
    """Data version of an eval report: its id in the eval_reports table."""
    return f"{EVAL_REPORT_PREFIX}{report_id}"


def eval_report_id(version: str) -> int:
    """The eval_reports id that data version `version` names (eval_report_version's inverse); a
    dg.Failure for a version that names none."""
    number = version.removeprefix(EVAL_REPORT_PREFIX)
    if number == version or not number.isdigit():
        raise dg.Failure(f"eval_report data version {version!r} names no eval report "
                         f"(expected {EVAL_REPORT_PREFIX}<id>)")
    return int(number)


# Files a stage's products also depend on beyond its asset modules and library folder.
STAGE_EXTRA_SOURCES = {"prompts": ("prompts/*.jinja",)}  # the templates a prompt set renders with


def stage_sources(stage: str, root: Path = REPO_ROOT) -> list[Path]:
    """Every file whose change changes what a stage makes: each module of assets/ that defines an
    asset of the stage (base_model.py is a training asset), every file under llmops_dagster/<stage>/
    (DeepSpeed configs included), and STAGE_EXTRA_SOURCES."""
    marker = f'stage_definition("{stage}")'
    modules = [path for path in sorted((root / "assets").glob("*.py")) if marker in path.read_text()]
    library = [path for path in sorted((root / "llmops_dagster" / stage).rglob("*"))
               if path.is_file() and "__pycache__" not in path.parts]
    extra = [path for pattern in STAGE_EXTRA_SOURCES.get(stage, ()) for path in sorted(root.glob(pattern))]
    return modules + library + extra


@cache  # several assets of a stage share it; read the files once a process
def stage_code_version(stage: str, root: Path = REPO_ROOT) -> str:
    """Code version of a lifecycle stage: a hash of its source files (`stage_sources`, by path and
    content), so the UI marks an asset's product stale exactly when the code that makes it changed."""
    digest = hashlib.sha256()
    for path in stage_sources(stage, root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


# Asset module -> its group in the UI and the team that owns its products.
STAGES = {
    "dataset": ("dataset", "team:data"),
    "prompts": ("prompts", "team:data"),
    "training": ("fine_tuning", "team:ml-engineering"),
    "evaluation": ("evaluation", "team:ml-engineering"),
    "governance": ("governance", "team:ml-governance"),
    "serving": ("serving", "team:ml-platform"),
    "feedback": ("feedback", "team:ml-platform"),
}


def stage_definition(stage: str) -> dict:
    """The @dg.asset arguments every asset of a stage shares: group, owner, code version, tags."""
    group, owner = STAGES[stage]
    return {"group_name": group, "owners": [owner], "code_version": stage_code_version(stage),
            "tags": {"llmops/stage": group}}
