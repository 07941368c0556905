"""Jobs: the lifecycle paths a person, the schedule or a sensor asks to run."""

import dagster as dg

# Products a person (or a sensor's own test) asks for, not part of a lifecycle path.
ON_DEMAND = dg.AssetSelection.assets("production_drift")

# The main job: every lifecycle product, from raw examples to the served model.
main_job = dg.define_asset_job(
    "main",
    selection=dg.AssetSelection.groups(
        "feedback", "dataset", "prompts", "fine_tuning", "evaluation", "governance", "serving"
    ) - ON_DEMAND,
    description="The whole lifecycle on the configured data: dataset, prompt set, embeddings, "
    "base model, fine-tune, eval report, approved model, serving deployment.",
)

# A requested retrain is never lost to a dead run worker: the daemon retries a retrain that failed
# outside its steps (the worker killed, e.g. with the daemon's process group; run monitoring marks
# it failed) up to twice, from the failure: finished steps are reused and the fine-tune resumes
# from its last complete DeepSpeed checkpoint (same settings, same version folder). A step that
# fails on its own (bad data, a gate) is not retried: the same inputs would fail again.
RETRAIN_RETRIES = {
    "dagster/max_retries": "2",
    "dagster/retry_strategy": "FROM_FAILURE",
    "dagster/retry_on_asset_or_op_failure": "false",
}

# The stale part after production feedback or drift: curate feedback, then everything downstream
# of it through serving_deployment (raw_examples is unchanged, so it is not rerun).
retrain_job = dg.define_asset_job(
    "retrain",
    selection=dg.AssetSelection.assets("feedback_table").downstream() - ON_DEMAND,
    tags=RETRAIN_RETRIES,
    description="Curate feedback, revalidate, retrain, re-evaluate, re-approve and redeploy.",
)

# Redeploys whatever the registry says is production (the reconciler's repair, or by hand).
deploy_job = dg.define_asset_job(
    "deploy", selection=dg.AssetSelection.assets("serving_deployment"),
    description="Serve the registry's production version.",
)

# rollback_guard's decision, applied in a run: the registry rollback (config rollback_from) and the
# redeploy in one step; retried on failure, and a reapplied rollback changes nothing.
rollback_job = dg.define_asset_job(
    "rollback", selection=dg.AssetSelection.assets("serving_deployment"),
    tags={"dagster/max_retries": "2"},
    description="Roll the registry back from a version (config) and serve the version it restores.",
)

# Jobs whose runs change what is served: while one is queued or running, no sensor asks for more.
SERVING_JOBS = ["main", "retrain", "deploy", "rollback"]
RETRAIN_JOBS = ["main", "retrain"]
