"""Governance stage: the approval gate between an evaluated candidate and production."""

import json
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.dataset import QUARANTINE_CHECK, validated_dataset
from assets.evaluation import eval_report
from assets.training import finetuned_checkpoint
from llmops_dagster.evaluation import scoring
from llmops_dagster.governance import policy, registry
from llmops_dagster.lineage import (
    failed_checks,
    lineage_metadata,
    model_lineage_versions,
    stage_definition,
    upstream_metadata,
)
from llmops_dagster.settings import declared
from resources.database import PostgresResource

MODES = ("automatic", "human")
# Blocking checks upstream of a model; every one must have passed for it to be approved.
BLOCKING_CHECKS = [dg.AssetCheckKey(validated_dataset.key, QUARANTINE_CHECK)]


class ApprovalConfig(dg.Config):
    mode: str = Field(default="automatic", description="'automatic', or 'human': wait for "
                      "`llmops models approve VERSION` and materialize again.")
    min_token_f1: float = declared(policy.Policy, "min_token_f1")
    min_exact_match: float = declared(policy.Policy, "min_exact_match")
    max_loss: float = declared(policy.Policy, "max_loss")
    margin: float = declared(policy.Policy, "margin")
    min_slice_exact_match: float = declared(policy.Policy, "min_slice_exact_match")
    require_trusted_no_regression: bool = declared(policy.Policy, "require_trusted_no_regression")
    approve_version: str = Field(default="", description="Human mode, from the launchpad: the "
                                 "candidate version a person approves (as `llmops models approve`).")
    approver: str = Field(default="", description="Who approves approve_version (required with it).")

    def to_policy(self) -> policy.Policy:
        return policy.Policy(min_token_f1=self.min_token_f1, min_exact_match=self.min_exact_match,
                             max_loss=self.max_loss, margin=self.margin,
                             min_slice_exact_match=self.min_slice_exact_match,
                             require_trusted_no_regression=self.require_trusted_no_regression)


@dg.asset(**stage_definition("governance"), deps=[eval_report, finetuned_checkpoint], kinds={"postgres"})
def approved_model(
    context: dg.AssetExecutionContext, config: ApprovalConfig, database: PostgresResource
) -> dg.MaterializeResult:
    """The production model: a candidate that passed the policy (and a person, in human mode)."""
    if config.mode not in MODES:
        raise dg.Failure(f"approved_model.mode must be one of {MODES}, got {config.mode!r}")
    engine = database.engine()
    candidate = upstream_metadata(context, finetuned_checkpoint)
    report = scoring.load_report(engine, upstream_metadata(context, eval_report)["report_id"])
    if report["candidate_version"] != candidate["version"]:
        raise dg.Failure(f"the latest eval_report judged {report['candidate_version']}, not the latest "
                         f"fine-tune {candidate['version']}: materialize eval_report first")
    version = registry.register_candidate(
        engine,
        version=candidate["version"],
        dataset_version=candidate["dataset_version"],
        prompt_set_version=candidate["prompt_set_version"],
        base_model_version=candidate["base_model_version"],
        checkpoint_path=candidate["deepspeed_checkpoints"],
        adapter_path=candidate["adapter_path"],
        merged_model_path=candidate["merged_model_path"],
        train_config=json.loads(Path(candidate["train_config"]).read_text()),
        eval_report_id=report["id"],
    )
    comparison, feedback_slice = scoring.read_comparison(report["comparison"])
    decision = policy.judge(config.to_policy(), report["metrics"]["candidate"], comparison,
                            failed_checks(context, BLOCKING_CHECKS),
                            feedback_comparison=feedback_slice["comparison"],
                            candidate_slices=(report["slices"] or {}).get("candidate"))
    if not decision.passed:
        if version.stage == "candidate":
            registry.reject(engine, version.version, actor="policy", reason=decision.message())
        raise dg.Failure(
            description=f"candidate {version.version} rejected: {decision.message()}",
            metadata={"decision": dg.MetadataValue.md(pd.DataFrame(decision.checks).to_markdown())},
        )
    if config.mode == "human" and config.approve_version and version.stage != "production":
        if config.approve_version != version.version:
            raise dg.Failure(f"approved_model.approve_version {config.approve_version!r} is not the "
                             f"candidate under review ({version.version})")
        if not config.approver.strip():
            raise dg.Failure("approved_model.approver must name the person who approves")
        version = registry.promote(engine, version.version, actor=config.approver.strip(),
                                   reason=f"approved in the launchpad (report {report['id']})")
    if config.mode == "human" and version.stage != "production":
        raise dg.Failure(
            description=f"candidate {version.version} passed the policy and awaits a person: run "
            f"`llmops models approve {version.version}` (or set approve_version and approver in the "
            f"launchpad), then materialize approved_model again",
        )
    change = "no change (already production)" if version.stage == "production" else "promoted"
    if version.stage != "production":
        try:
            version = registry.promote(engine, version.version, actor="policy", automatic=True,
                                       reason=f"passed the policy (report {report['id']})")
        except registry.RegistryError as error:  # a rolled-back version: only a person
            raise dg.Failure(description=str(error)) from None
    versions = pd.DataFrame([{"version": v.version, "stage": v.stage, "approver": v.approver,
                              "dataset": v.dataset_version, "updated": str(v.updated_at)[:19]}
                             for v in registry.list_versions(engine)[:10]])
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version.version),
        tags={"llmops/model_version": version.version},
        metadata={
            **lineage_metadata(context.instance, {
                k: v for k, v in model_lineage_versions(engine, version).items()
                if k != "approved_model"}),
            "version": version.version,
            "stage": version.stage,
            "change": change,
            "approver": version.approver or "-",
            "eval_report_id": report["id"],
            "decision": dg.MetadataValue.md(pd.DataFrame(decision.checks).to_markdown(index=False)),
            "registry": dg.MetadataValue.md(versions.to_markdown(index=False)),
            "merged_model_path": dg.MetadataValue.path(version.merged_model_path),
        },
    )
