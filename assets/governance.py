"""Governance stage: the approval gate between an evaluated candidate and production."""

import dagster as dg

from assets.dataset import QUARANTINE_CHECK, validated_dataset
from assets.evaluation import eval_report
from assets.training import finetune_record, finetuned_checkpoint
from llmops_dagster.evaluation import scoring
from llmops_dagster.governance import approval, policy
from llmops_dagster.governance.approval import ApprovalRequest
from llmops_dagster.infra.lineage import (
    eval_report_id,
    failed_checks,
    lineage_metadata,
    model_lineage_versions,
    stage_definition,
    upstream_product,
)
from llmops_dagster.infra.settings import copy_into, declared
from resources.database import PostgresResource

# Blocking checks upstream of a model; every one must have passed for it to be approved.
BLOCKING_CHECKS = [dg.AssetCheckKey(validated_dataset.key, QUARANTINE_CHECK)]


class ApprovalConfig(dg.Config):
    mode: str = declared(ApprovalRequest, "mode")
    min_token_f1: float = declared(policy.Policy, "min_token_f1")
    min_exact_match: float = declared(policy.Policy, "min_exact_match")
    max_loss: float = declared(policy.Policy, "max_loss")
    margin: float = declared(policy.Policy, "margin")
    min_slice_exact_match: float = declared(policy.Policy, "min_slice_exact_match")
    require_trusted_no_regression: bool = declared(policy.Policy, "require_trusted_no_regression")
    min_complaint_improvement: float = declared(policy.Policy, "min_complaint_improvement")
    min_complaint_examples: int = declared(policy.Policy, "min_complaint_examples")
    require_improvement: bool = declared(ApprovalRequest, "require_improvement")
    approve_version: str = declared(ApprovalRequest, "approve_version")
    approver: str = declared(ApprovalRequest, "approver")

    def to_policy(self) -> policy.Policy:
        return copy_into(self, policy.Policy)

    def request(self) -> ApprovalRequest:
        return copy_into(self, ApprovalRequest)


@dg.asset(**stage_definition("governance"), deps=[eval_report, finetuned_checkpoint], kinds={"postgres"})
def approved_model(
    context: dg.AssetExecutionContext, config: ApprovalConfig, database: PostgresResource
) -> dg.MaterializeResult:
    """The production model: a candidate that passed the policy (and a person, in human mode);
    with require_improvement (the loop's retrains) only one that improves the complaint slice."""
    engine = database.engine()
    try:
        approval.check_mode(config.request())
        candidate = finetune_record(context)
        report = scoring.load_report(engine, eval_report_id(upstream_product(context, eval_report).version))
        outcome = approval.approve(engine, config.request(), config.to_policy(), candidate, report,
                                   failed_checks(context, BLOCKING_CHECKS))
    except approval.ApprovalRefused as refusal:
        metadata = ({"decision": dg.MetadataValue.md(approval.decision_markdown(refusal.decision, True))}
                    if refusal.decision is not None else None)
        raise dg.Failure(description=str(refusal), metadata=metadata) from None
    return dg.MaterializeResult(
        data_version=dg.DataVersion(outcome.version.version),
        tags={"llmops/model_version": outcome.version.version},
        metadata=approval_metadata(context.instance, engine, outcome, report["id"]),
    )


def approval_metadata(instance: dg.DagsterInstance, engine, outcome: approval.ApprovalOutcome,
                      report_id: int) -> dict:
    """approved_model's metadata: the production version now (after a "no improvement", the one
    that stays), its lineage, the decision, why and the complaint slice's figures, the registry."""
    version = outcome.version
    return {
        **lineage_metadata(instance, {k: v for k, v in model_lineage_versions(engine, version).items()
                                      if k != "approved_model"}),
        "version": version.version,
        "stage": version.stage,
        "change": outcome.change,
        "candidate_version": outcome.candidate or version.version,
        **({"reason": outcome.reason} if outcome.reason else {}),
        **outcome.figures,
        "approver": version.approver or "-",
        "eval_report_id": report_id,
        "decision": dg.MetadataValue.md(approval.decision_markdown(outcome.decision)),
        "registry": dg.MetadataValue.md(approval.registry_markdown(engine)),
        "merged_model_path": dg.MetadataValue.path(version.merged_model_path),
    }
