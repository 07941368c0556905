"""Fine-tuning stage, first product: the base model, built from the validated dataset (a small
Llama with a tokenizer trained on it) or a pretrained folder; the prompt set renders for it."""

import dagster as dg
from pydantic import Field

from assets.dataset import validated_dataset
from llmops_dagster.dataset import dataset_store
from llmops_dagster.infra.lineage import stage_definition, upstream_product, upstream_record
from llmops_dagster.infra.settings import copy_into, declared
from llmops_dagster.training import base_model as base_models
from llmops_dagster.training.base_model import ScratchModelSpec
from resources.artifacts import ArtifactStore
from resources.database import PostgresResource

SCRATCH = base_models.SCRATCH_KIND


class BaseModelConfig(dg.Config):
    source: str = Field(
        default=SCRATCH,
        description="'scratch' builds a small Llama from the sizes below with a BPE tokenizer "
        "trained on the training split; otherwise a local Hugging Face folder (a pretrained model "
        "saved with save_pretrained, its tokenizer and chat template beside it) or model id.",
    )
    vocab_size: int = declared(ScratchModelSpec, "vocab_size")
    hidden_size: int = declared(ScratchModelSpec, "hidden_size")
    intermediate_size: int = declared(ScratchModelSpec, "intermediate_size")
    num_hidden_layers: int = declared(ScratchModelSpec, "num_hidden_layers")
    num_attention_heads: int = declared(ScratchModelSpec, "num_attention_heads")
    max_position_embeddings: int = declared(ScratchModelSpec, "max_position_embeddings")
    seed: int = declared(ScratchModelSpec, "seed")
    tokenizer_template: str = Field(
        default="customer_support.v1",
        description="Scratch model only: the prompts/ template (prompt_set.template) its tokenizer "
        "learns with the data, each example rendered by it, so that the template's words are single "
        "tokens and the prompt fits seq_len. A pretrained model brings its own tokenizer.",
    )

    def spec(self) -> ScratchModelSpec:
        return copy_into(self, ScratchModelSpec)


@dg.asset(**stage_definition("training"), deps=[validated_dataset], kinds={"transformers"})
def base_model(
    context: dg.AssetExecutionContext, config: BaseModelConfig, artifacts: ArtifactStore,
    database: PostgresResource,
) -> dg.MaterializeResult:
    """The causal LM to fine-tune, as a Hugging Face folder loadable with from_pretrained."""
    dataset = upstream_record(context, validated_dataset, database.engine(),
                              dataset_store.recorded_dataset)
    try:
        model = base_models.prepare_base_model(config.source, config.spec(), config.tokenizer_template,
                                               dataset.path, artifacts.write_content_addressed)
    except base_models.BaseModelError as error:
        raise dg.Failure(description=str(error)) from error
    scratch = model.kind == base_models.SCRATCH_KIND
    return dg.MaterializeResult(
        data_version=dg.DataVersion(model.version),
        metadata={
            "version": model.version,
            "path": dg.MetadataValue.path(model.path),
            "source": config.source,
            "kind": model.kind,
            "chat_template": base_models.has_chat_template(model.path),
            "tokenizer_trained_on": dataset.version if scratch else "-",
            "tokenizer_template": config.tokenizer_template if scratch else "-",
            **base_models.describe(model.path),
        },
    )


def upstream_base_model(context: dg.AssetExecutionContext) -> base_models.BaseModelProduct:
    """The base model this asset builds on, typed (`upstream_product`'s version and the
    materialization that carries it)."""
    product = upstream_product(context, base_model)
    return base_models.BaseModelProduct.from_materialization(product.version, product.metadata)
