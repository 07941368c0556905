"""Fine-tuning stage, first product: the base model, built from the validated dataset (a small
Llama with a tokenizer trained on it) or a pretrained folder; the prompt set renders for it."""

import dagster as dg
from pydantic import Field

from assets.dataset import validated_dataset
from llmops_dagster.dataset import dataset_store
from llmops_dagster.lineage import stage_definition, upstream_metadata
from llmops_dagster.prompts import templates
from llmops_dagster.prompts.rendering import RenderingError
from llmops_dagster.settings import PROMPTS_DIR, declared
from llmops_dagster.training import base_model as base_models
from llmops_dagster.training import launch
from llmops_dagster.training.base_model import ScratchModelSpec
from resources.artifacts import ArtifactStore

SCRATCH = "scratch"


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
        fields = ScratchModelSpec.__dataclass_fields__
        return ScratchModelSpec(**{name: getattr(self, name) for name in fields})


@dg.asset(**stage_definition("training"), deps=[validated_dataset], kinds={"transformers"})
def base_model(
    context: dg.AssetExecutionContext, config: BaseModelConfig, artifacts: ArtifactStore
) -> dg.MaterializeResult:
    """The causal LM to fine-tune, as a Hugging Face folder loadable with from_pretrained."""
    dataset = upstream_metadata(context, validated_dataset)
    if config.source == SCRATCH:
        # The tokenizer learns from the source's training rows only: feedback rows change with every
        # retrain, and a base model (its vocabulary) that changed with them would make each retrain
        # start over from a new random model, where it can continue from production's adapter.
        try:
            template = templates.load_template(PROMPTS_DIR, config.tokenizer_template)
            texts = base_models.tokenizer_corpus(dataset_store.read_accepted(dataset["path"]), template)
        except RenderingError as error:
            raise dg.Failure(description=f"base_model.tokenizer_template: {error}") from error
        version, folder = artifacts.write_content_addressed(
            "base_models", lambda d: base_models.build_scratch_model(texts, config.spec(), d)
        )
        path = str(folder)
    else:
        try:
            base_models.check_loadable(config.source)
        except base_models.BaseModelError as error:
            raise dg.Failure(description=str(error)) from error
        path = config.source
        # The folder's small files (config, tokenizer, chat template) and its weights' names and
        # sizes: a model saved again over the same folder is a new version.
        version = launch.run_version({"source": config.source,
                                      "files": base_models.folder_fingerprint(config.source)})
    description = base_models.describe(path)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "version": version,
            "path": dg.MetadataValue.path(path),
            "source": config.source,
            "kind": base_models.SCRATCH_KIND if config.source == SCRATCH else base_models.PRETRAINED_KIND,
            "chat_template": base_models.has_chat_template(path),
            "tokenizer_trained_on": dataset["version"] if config.source == SCRATCH else "-",
            "tokenizer_template": config.tokenizer_template if config.source == SCRATCH else "-",
            **description,
        },
    )
