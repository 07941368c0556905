"""Prompt stage: a versioned template rendered over the validated dataset into train and eval."""


from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.dataset import validated_dataset
from llmops_dagster.dataset import dataset_store
from llmops_dagster.lineage import stage_definition, upstream_metadata
from llmops_dagster.prompts import templates
from llmops_dagster.settings import PROMPTS_DIR
from resources.artifacts import ArtifactStore
from resources.database import PostgresResource


class PromptSetConfig(dg.Config):
    template: str = Field(
        default="customer_support.v1", description="Template file in prompts/, without .jinja."
    )
    prompts_dir: str = Field(default="", description="Template folder; empty means prompts/.")


@dg.asset(**stage_definition("prompts"), deps=[validated_dataset], kinds={"jinja"})
def prompt_set(
    context: dg.AssetExecutionContext,
    config: PromptSetConfig,
    database: PostgresResource,
    artifacts: ArtifactStore,
) -> dg.MaterializeResult:
    """Train and eval records rendered from a versioned prompt template over the validated dataset."""
    dataset = upstream_metadata(context, validated_dataset)
    template = templates.load_template(Path(config.prompts_dir or PROMPTS_DIR), config.template)
    version = templates.prompt_set_version(template, dataset["version"])
    records = templates.render_records(template, dataset_store.read_accepted(dataset["path"]))
    folder = artifacts.write_version(
        "prompt_sets", version, lambda d: templates.write_prompt_set(d, records, template)
    )
    counts = records["split"].value_counts()
    templates.record_prompt_set_version(
        database.engine(), version, dataset["version"], template, folder,
        int(counts.get("train", 0)), int(counts.get("eval", 0)),
    )
    sample = records.head(3)[["prompt", "completion", "split"]]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "version": version,
            "dataset_version": dataset["version"],
            "template": template.name,
            "template_sha": template.sha,
            "template_text": dg.MetadataValue.md(f"```jinja\n{template.text}\n```"),
            "path": dg.MetadataValue.path(str(folder)),
            "train_rows": int(counts.get("train", 0)),
            "eval_rows": int(counts.get("eval", 0)),
            "sample": dg.MetadataValue.md(sample.to_markdown(index=False)),
        },
    )
