"""Jobs: the lifecycle paths a person, the schedule or a sensor asks to run."""

import dagster as dg

# The main job: every lifecycle product built so far, from raw examples on.
main_job = dg.define_asset_job(
    "main",
    selection=dg.AssetSelection.groups(
        "feedback", "dataset", "prompts", "fine_tuning", "evaluation", "governance", "serving"
    ),
    description="The whole lifecycle on the configured data: dataset, prompt set, embeddings, "
    "base model, fine-tune, eval report, approved model, serving deployment.",
)
