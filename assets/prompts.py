"""Prompt stage: a versioned template rendered over the validated dataset into train and eval."""


from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.base_model import base_model, upstream_base_model
from assets.dataset import validated_dataset
from llmops_dagster.dataset import dataset_store
from llmops_dagster.infra.lineage import stage_definition, upstream_record
from llmops_dagster.infra.settings import PROMPTS_DIR
from llmops_dagster.prompts import rendering, templates
from resources.artifacts import ArtifactStore
from resources.database import PostgresResource


class PromptSetConfig(dg.Config):
    rendering: str = Field(
        default="auto",
        description="'auto': the base model's chat template when its tokenizer has one, else the "
        "template below; 'chat_template': the base model's (an error when it has none); "
        "'template': the template below whatever the base model has.",
    )
    template: str = Field(
        default="customer_support.v1", description="Template file in prompts/, without .jinja "
        "(variables: prompt, messages, system)."
    )
    prompts_dir: str = Field(default="", description="Template folder; empty means prompts/.")


@dg.asset(**stage_definition("prompts"), deps=[validated_dataset, base_model], kinds={"jinja"})
def prompt_set(context: dg.AssetExecutionContext, config: PromptSetConfig, database: PostgresResource,
               artifacts: ArtifactStore) -> dg.MaterializeResult:
    """Train and eval records: the validated dataset's conversations rendered by the base model's
    chat template or a versioned prompt template."""
    engine = database.engine()
    dataset = upstream_record(context, validated_dataset, engine, dataset_store.recorded_dataset)
    base = upstream_base_model(context)
    try:
        renderer, records = templates.render_prompt_set(
            config.rendering, Path(config.prompts_dir or PROMPTS_DIR), config.template, base.path,
            dataset_store.read_accepted(dataset.path))
    except rendering.RenderingError as error:
        raise dg.Failure(description=str(error)) from error
    if mismatch := templates.learned_template_mismatch(base.tokenizer_template, renderer):
        context.log.warning(mismatch)
    version = templates.prompt_set_version(renderer, dataset.version)
    folder = artifacts.write_version("prompt_sets", version,
                                     lambda d: templates.write_prompt_set(d, records, renderer))
    train_rows, eval_rows = templates.split_rows(records)
    templates.record_prompt_set_version(engine, version, dataset.version, renderer,
                                        folder, train_rows, eval_rows)
    sample = records.head(3)[["prompt", "completion", "split"]]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "version": version,
            "dataset_version": dataset.version,
            "base_model_version": base.version,
            "rendering": renderer.kind,
            "template": renderer.name,
            "template_sha": renderer.sha,
            "template_text": dg.MetadataValue.md(f"```jinja\n{renderer.text}\n```"),
            "path": dg.MetadataValue.path(str(folder)),
            "train_rows": train_rows,
            "eval_rows": eval_rows,
            "sample": dg.MetadataValue.md(sample.to_markdown(index=False)),
        },
    )
