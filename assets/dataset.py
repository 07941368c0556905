"""Dataset stage: raw examples in, validated dataset and its drift reference embeddings out."""

import hashlib
import json
from dataclasses import asdict

import dagster as dg
from pydantic import Field

from assets.feedback import feedback_table
from llmops_dagster.dataset import dataset_store, embeddings, validated
from llmops_dagster.dataset.eda import profile_examples
from llmops_dagster.dataset.formats import FORMATS, ColumnMapping, FormatError
from llmops_dagster.dataset.raw_data import SYNTHETIC, load_examples, snapshot_source
from llmops_dagster.dataset.validation import ValidationRules, data_version
from llmops_dagster.infra.lineage import stage_definition, upstream_product, upstream_record
from llmops_dagster.infra.settings import declared
from resources.artifacts import ArtifactStore
from resources.database import PostgresResource
from resources.embedder import EmbedderResource

QUARANTINE_CHECK = "quarantine_within_threshold"
DEFAULT_READING = {"format": "auto", "columns": asdict(ColumnMapping())}
FEEDBACK_CHECK = "feedback_quarantine_within_budget"


class ColumnsConfig(dg.Config):
    """Which source column holds each part of an example (see formats.ColumnMapping)."""

    prompt: str = declared(ColumnMapping, "prompt")
    response: str = declared(ColumnMapping, "response")
    slice: str = declared(ColumnMapping, "slice")
    split: str = declared(ColumnMapping, "split")
    messages: str = declared(ColumnMapping, "messages")

    def mapping(self) -> ColumnMapping:
        return ColumnMapping(**self.model_dump())


class RawExamplesConfig(dg.Config):
    source: str = Field(
        default=SYNTHETIC,
        description="A JSONL, CSV or Parquet file, a folder of such files named by split "
        "(train.jsonl, test.jsonl, ...) or a saved `datasets` folder (its splits kept); "
        "'synthetic' for the built-in customer-support set.",
    )
    format: str = Field(
        default="auto", description=f"One of {', '.join(FORMATS)}: 'columns' (any columns, mapped "
        "below), 'chat' ({'messages': [{'role', 'content'}, ...]}: the last assistant turn is the "
        "target), 'instruction' (instruction, input, output); 'auto' picks by the columns present.")
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig,
                                   description="Source column of each part of an example.")
    synthetic_rows: int = Field(default=2400, description="Rows of the synthetic set.")
    seed: int = Field(default=7, description="Seed of the synthetic set.")


@dg.asset(**stage_definition("dataset"), kinds={"pandas"})
def raw_examples(config: RawExamplesConfig, artifacts: ArtifactStore) -> dg.MaterializeResult:
    """Raw instruction examples: a byte-exact snapshot of the configured source, with an EDA profile."""
    snapshot = {}

    def write(folder):
        snapshot["path"] = snapshot_source(config.source, folder, config.synthetic_rows, config.seed)

    input_hash, folder = artifacts.write_content_addressed("raw", write)
    snapshot_path = folder / snapshot["path"].name
    mapping = config.columns.mapping()
    try:
        frame = load_examples(snapshot_path, config.format, mapping)
    except FormatError as error:
        raise dg.Failure(description=str(error)) from error
    profile = profile_examples(frame)
    # The version covers how the bytes are read: the same file read in another format or with
    # other columns is another product.
    reading = {"format": config.format, "columns": asdict(mapping)}
    version = input_hash if reading == DEFAULT_READING else hashlib.sha256(
        f"{input_hash}:{json.dumps(reading, sort_keys=True)}".encode()).hexdigest()
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "source": config.source,
            "input_hash": input_hash,
            "format": config.format,
            "format_read": frame.attrs["format"],
            "columns": dg.MetadataValue.json(asdict(mapping)),
            "example_columns_from": dg.MetadataValue.json(frame.attrs["origins"]),
            "snapshot_path": dg.MetadataValue.path(str(snapshot_path)),
            "dagster/row_count": len(frame),
            "duplicate_rows": profile.duplicate_rows,
            "slices": len(profile.slices),
            "eda_profile": dg.MetadataValue.md(profile.markdown()),
        },
    )


class ValidatedDatasetConfig(dg.Config):
    max_quarantined_share: float = Field(
        default=0.05, description="The blocking check fails above this share of the source's rows "
        "quarantined (feedback examples have their own budget)."
    )
    max_feedback_quarantined_share: float = Field(
        default=0.2, description="Feedback examples' own budget: above this share of them "
        "quarantined, all are left out of the version (a warning, never a blocked retrain).")
    max_feedback_rows: int = Field(
        default=500, description="Most feedback examples in one version (the newest accepted ones).")
    max_prompt_tokens: int = declared(ValidationRules, "max_prompt_tokens")
    max_response_tokens: int = declared(ValidationRules, "max_response_tokens")
    min_tokens: int = declared(ValidationRules, "min_tokens")
    eval_fraction: float = declared(ValidationRules, "eval_fraction")

    def rules(self) -> ValidationRules:
        return ValidationRules(
            min_tokens=self.min_tokens,
            max_prompt_tokens=self.max_prompt_tokens,
            max_response_tokens=self.max_response_tokens,
            eval_fraction=self.eval_fraction,
        )


@dg.asset(
    **stage_definition("dataset"),
    deps=[raw_examples, feedback_table],
    kinds={"great_expectations", "postgres"},
    check_specs=[
        dg.AssetCheckSpec(
            QUARANTINE_CHECK,
            asset="validated_dataset",
            blocking=True,
            description="Fails when a required column is missing or the quarantined share "
            "of the source's rows passes the configured threshold.",
        ),
        dg.AssetCheckSpec(
            FEEDBACK_CHECK, asset="validated_dataset", blocking=False,
            description="Warns when the share of quarantined feedback examples passes their own "
            "budget; they are then left out and training goes on with the source's rows.",
        ),
    ],
)
def validated_dataset(
    context: dg.AssetExecutionContext,
    config: ValidatedDatasetConfig,
    database: PostgresResource,
    artifacts: ArtifactStore,
) -> dg.MaterializeResult:
    """Examples that passed every Great Expectations check; the rest are quarantined with reasons."""
    raw = upstream_product(context, raw_examples).metadata
    engine = database.engine()
    examples = validated.gather_examples(engine, raw, config.max_feedback_rows)
    outcome = validated.validate_and_quarantine(engine, examples, config.rules(), raw, context.run_id,
                                                config.max_feedback_quarantined_share)
    report, budget = outcome.report, outcome.budget
    if not budget.within:
        context.log.warning(budget.message())
    context.log.info(f"progress: {report.rows_input} rows validated: {report.rows_accepted} accepted, "
                     f"{report.rows_quarantined} quarantined")
    version = data_version(report.accepted)
    folder = artifacts.write_version(
        "datasets", version, lambda d: dataset_store.write_accepted(d, report.accepted)
    )
    dataset_store.record_dataset_version(engine, version, raw["input_hash"], raw["source"], folder, report)
    check = dataset_store.quarantine_check(report, config.max_quarantined_share,
                                           raw_rows=len(examples.snapshot))
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        check_results=_check_results(check, outcome, config.max_quarantined_share),
        metadata={
            "version": version,
            "path": dg.MetadataValue.path(str(folder)),
            "input_hash": raw["input_hash"],
            **outcome.counts(),
            "checks": dg.MetadataValue.md(dataset_store.checks_markdown(report)),
            "quarantine": dg.MetadataValue.md(dataset_store.quarantine_summary(report)),
        },
    )


def _check_results(check: dataset_store.QuarantineCheck, outcome: validated.Validation,
                   threshold: float) -> list[dg.AssetCheckResult]:
    """The blocking quarantine gate and the feedback budget's warning, as check results."""
    report, budget = outcome.report, outcome.budget
    return [
        dg.AssetCheckResult(
            check_name=QUARANTINE_CHECK,
            passed=check.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description=check.message,
            metadata={"quarantined_share": report.quarantined_share, "threshold": threshold},
        ),
        dg.AssetCheckResult(
            check_name=FEEDBACK_CHECK, passed=budget.within,
            severity=dg.AssetCheckSeverity.WARN, description=budget.message(),
            metadata={"feedback_rows": budget.rows, "quarantined": budget.quarantined,
                      "budget": budget.max_share},
        ),
    ]


@dg.asset(**stage_definition("dataset"), deps=[validated_dataset], kinds={"pgvector"})
def dataset_embeddings(
    context: dg.AssetExecutionContext,
    database: PostgresResource,
    embedder: EmbedderResource,
) -> dg.MaterializeResult:
    """Embeddings of the training prompts in pgvector (HNSW), the reference set for drift."""
    engine = database.engine()
    dataset = upstream_record(context, validated_dataset, engine, dataset_store.recorded_dataset)
    train = embeddings.training_prompts(dataset_store.read_accepted(dataset.path))
    before = embeddings.stored_rows(engine, dataset.version)
    # Prompts an earlier version embedded with this model keep their vectors (a retrain adds a
    # few feedback rows to the same prompts); only the others go through the model.
    stored = embeddings.reuse_embeddings(engine, dataset.version, embedder.identity(),
                                         train["_row_number"].tolist(), train["_embedded"].tolist())
    reused = len(stored) - before
    missing = train[~train["_row_number"].isin(stored)]
    embedding_s = 0.0
    if len(missing):
        context.log.info(f"progress: embedding {len(missing)} of {len(train)} training prompts "
                         f"({before} stored already, {reused} reused from earlier versions)")
        embedding_s = embeddings.embed_and_store(engine, dataset.version, missing, embedder.embed,
                                                 embedder.identity())
    after = embeddings.stored_rows(engine, dataset.version)
    context.log.info(f"progress: {after} rows embedded ({after - before} new: {reused} reused, "
                     f"{len(missing)} computed in {embedding_s:.1f} s)")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(dataset.version),
        metadata={
            "dataset_version": dataset.version,
            "rows": after,
            "rows_added": after - before,
            "rows_reused": reused,  # vectors copied from an earlier version (same prompt and model)
            "embedding_s": dg.MetadataValue.float(round(embedding_s, 2)),  # the model's own time
            "dimensions": 384,
            "index": "HNSW, cosine",
        },
    )
