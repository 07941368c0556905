"""Feedback stage, preference data: pairs of a preferred and a dispreferred answer from people's
counted ratings and accepted corrections, rendered for the prompt set, validated and capped per
actor (llmops_dagster/feedback/preferences.py). The fine-tune adds a preference step on them when
there are enough pairs (finetuned_checkpoint.min_preference_pairs)."""

import dagster as dg

from assets.base_model import base_model, upstream_base_model
from assets.feedback import feedback_table
from assets.prompts import prompt_set
from llmops_dagster.feedback import preferences
from llmops_dagster.feedback.preferences import PreferenceRules
from llmops_dagster.infra.lineage import stage_definition, upstream_product, upstream_record
from llmops_dagster.infra.settings import copy_into, declared
from llmops_dagster.prompts import templates
from llmops_dagster.serving import traffic_log
from resources.artifacts import ArtifactStore
from resources.database import PostgresResource


class PreferenceDatasetConfig(dg.Config):
    max_chars: int = declared(PreferenceRules, "max_chars")
    max_actor_share: float = declared(PreferenceRules, "max_actor_share")
    max_rows: int = declared(PreferenceRules, "max_rows")

    def rules(self) -> PreferenceRules:
        return copy_into(self, PreferenceRules)


@dg.asset(**stage_definition("feedback"), deps=[feedback_table, prompt_set, base_model], kinds={"jsonl"})
def preference_dataset(context: dg.AssetExecutionContext, config: PreferenceDatasetConfig,
                       database: PostgresResource, artifacts: ArtifactStore) -> dg.MaterializeResult:
    """Preference pairs (corrections over down-voted answers, up-voted over down-voted answers to
    the same prompt) and single rated answers, rendered as the prompt set renders its records."""
    engine = database.engine()
    prompts = upstream_record(context, prompt_set, engine, templates.recorded_prompt_set)
    built = preferences.preference_set(traffic_log.rated_answers(engine, config.max_rows), config.rules())
    renderer = templates.recorded_renderer(engine, prompts.version)
    tokenizer = preferences.tokenizer_for(renderer, upstream_base_model(context).path)
    version = preferences.version_of(built, prompts.version)
    folder = artifacts.write_version("preferences", version,
                                     lambda d: preferences.write_set(d, built, renderer, tokenizer))
    counts = built.counts()
    context.log.info(f"progress: {counts['pairs']} preference pairs ({counts['rejected']} rejected) "
                     f"from {counts['actors']} actors, {counts['singles']} single ratings")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={"version": version, "path": dg.MetadataValue.path(str(folder)),
                  "prompt_set_version": prompts.version, **counts,
                  "rejected_reasons": dg.MetadataValue.md(preferences.reasons_markdown(built))},
    )


def upstream_preferences(context: dg.AssetExecutionContext) -> preferences.PreferenceSetProduct | None:
    """The preference set this asset builds on, typed (`upstream_product`'s version and the
    materialization that carries it); None when preference_dataset was never materialized (a
    fine-tune then has no preference step, as with too few pairs)."""
    product = upstream_product(context, preference_dataset, required=False)
    return (preferences.PreferenceSetProduct.from_materialization(product.version, product.metadata)
            if product is not None else None)
