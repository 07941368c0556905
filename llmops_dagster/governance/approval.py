"""The approval flow between an evaluated candidate and production: register the candidate, judge
it by the policy, wait for a person in human mode, promote it; a typed outcome, or a refusal that
says why. A loop retrain (require_improvement) that passes the policy but does not improve the
complaint slice is an outcome too ("no improvement"): rejected in the registry, production kept."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from llmops_dagster.evaluation import complaints, scoring
from llmops_dagster.governance import policy, registry

MODES = ("automatic", "human")


@dataclass(frozen=True)
class ApprovalRequest:
    """How approved_model runs: its mode and, in human mode, the approval a person gives from
    the launchpad."""

    mode: str = field(default="automatic", metadata={
        "help": "'automatic', or 'human': wait for `llmops models approve VERSION` and materialize "
        "again."})
    approve_version: str = field(default="", metadata={
        "help": "Human mode, from the launchpad: the candidate version a person approves (as "
        "`llmops models approve`)."})
    approver: str = field(default="", metadata={
        "help": "Who approves approve_version (required with it)."})
    require_improvement: bool = field(default=False, metadata={
        "help": "Promote only a candidate that improves the complaint slice by "
        "min_complaint_improvement over production (the loop's retrains set it: the feedback and "
        "drift sensors and the nightly schedule); otherwise it is rejected as 'no improvement', "
        "production and the served model stay, and the materialization succeeds."})


class ApprovalRefused(Exception):
    """The candidate does not become production (now); the message says why and what to do.
    `decision` is the policy's, when the policy rejected it."""

    def __init__(self, message: str, decision: policy.Decision | None = None):
        super().__init__(message)
        self.decision = decision


NO_IMPROVEMENT = "no improvement"  # the change of a candidate kept out by require_improvement


@dataclass(frozen=True)
class ApprovalOutcome:
    version: registry.ModelVersion  # the production version now
    change: str  # "promoted", "no change (already production)" or NO_IMPROVEMENT
    decision: policy.Decision
    candidate: str = ""  # the version judged
    reason: str = ""  # why (NO_IMPROVEMENT: policy.Improvement.reason)
    figures: dict = field(default_factory=dict)  # the complaint slice's, when it was judged


def check_mode(request: ApprovalRequest) -> None:
    if request.mode not in MODES:
        raise ApprovalRefused(f"approved_model.mode must be one of {MODES}, got {request.mode!r}")


def approve(engine, request: ApprovalRequest, rules: policy.Policy, candidate, report: dict,
            failed_checks: list[str]) -> ApprovalOutcome:
    """Register `candidate` (a training.plan.FinetuneRecord) with its eval report `report` (an
    eval_reports row), judge it by `rules` and the upstream checks that failed, and promote it
    (automatic mode, or human mode with the person's approval in `request`); ApprovalRefused
    otherwise. A rejected candidate is marked rejected in the registry. With
    `request.require_improvement`, a candidate that passes the policy but does not improve the
    complaint slice is the NO_IMPROVEMENT outcome (`_improvement`), not a refusal."""
    check_mode(request)
    if report["candidate_version"] != candidate.version:
        raise ApprovalRefused(f"the latest eval_report judged {report['candidate_version']}, not the "
                              f"latest fine-tune {candidate.version}: materialize eval_report first")
    version = registry.register_candidate(
        engine, version=candidate.version, dataset_version=candidate.dataset_version,
        prompt_set_version=candidate.prompt_set_version,
        base_model_version=candidate.base_model_version, checkpoint_path=candidate.checkpoint_path,
        adapter_path=candidate.adapter_path, merged_model_path=candidate.merged_model_path,
        train_config=candidate.train_config(), eval_report_id=report["id"],
    )
    comparison, feedback_slice = scoring.read_comparison(report["comparison"])
    decision = policy.judge(rules, report["metrics"]["candidate"], comparison, failed_checks,
                            feedback_comparison=feedback_slice["comparison"],
                            candidate_slices=(report["slices"] or {}).get("candidate"))
    kept = _improvement(engine, request, rules, version, report, decision)
    if not decision.passed:
        if version.stage == "candidate":
            registry.reject(engine, version.version, actor="policy", reason=decision.message())
        raise ApprovalRefused(f"candidate {version.version} rejected: {decision.message()}", decision)
    if kept is not None:
        return kept
    if request.mode == "human" and version.stage != "production":
        version = _approved_by_person(engine, request, version, report["id"])
    change = "no change (already production)" if version.stage == "production" else "promoted"
    if version.stage != "production":
        try:
            version = registry.promote(engine, version.version, actor="policy", automatic=True,
                                       reason=f"passed the policy (report {report['id']})")
        except registry.RegistryError as error:  # a rolled-back version: only a person
            raise ApprovalRefused(str(error)) from None
    return ApprovalOutcome(version=version, change=change, decision=decision, candidate=version.version)


def _improvement(engine, request: ApprovalRequest, rules: policy.Policy, version: registry.ModelVersion,
                 report: dict, decision: policy.Decision) -> ApprovalOutcome | None:
    """With require_improvement and a production version: the NO_IMPROVEMENT outcome of a
    candidate that does not improve the complaint slice (policy.improvement; its rule joins
    `decision`'s checks), after rejecting it in the registry when it passed the other rules and is
    a candidate; None when it improves, or the rule does not apply (a person's run, a first model).
    The production version itself (a retrain on unchanged data) is no improvement either, with
    nothing changed in the registry."""
    production = registry.production(engine)
    if not request.require_improvement or production is None:
        return None
    complaint_slice = complaints.read_slice(report["comparison"])
    judged = complaint_slice["champion_version"]
    if judged is not None and judged != production.version:  # production changed since
        raise ApprovalRefused(f"eval report {report['id']} measured the complaint slice on {judged}, "
                              f"not on the production version {production.version}: materialize "
                              "eval_report again")
    verdict = policy.improvement(rules, complaint_slice)
    if production.version == version.version:
        verdict = policy.Improvement(False, f"{policy.NO_IMPROVEMENT}the candidate is the production "
                                     f"version {version.version} already (a retrain that reproduced it)",
                                     verdict.figures, {"rule": "a new version", "value": version.version,
                                                       "threshold": "not production", "passed": False})
    decision.checks.append(verdict.check)
    if verdict.improved:
        return None
    if decision.passed and version.stage == "candidate":
        registry.reject(engine, version.version, actor="policy", reason=verdict.reason)
    return ApprovalOutcome(version=production, change=NO_IMPROVEMENT, decision=decision,
                           candidate=version.version, reason=verdict.reason, figures=verdict.figures)


def _approved_by_person(engine, request: ApprovalRequest, version: registry.ModelVersion,
                        report_id: int) -> registry.ModelVersion:
    """Human mode: `version` promoted by the approval given in the launchpad, or ApprovalRefused
    saying how to approve it."""
    if request.approve_version:
        if request.approve_version != version.version:
            raise ApprovalRefused(f"approved_model.approve_version {request.approve_version!r} is "
                                  f"not the candidate under review ({version.version})")
        if not request.approver.strip():
            raise ApprovalRefused("approved_model.approver must name the person who approves")
        version = registry.promote(engine, version.version, actor=request.approver.strip(),
                                   reason=f"approved in the launchpad (report {report_id})")
    if version.stage != "production":
        raise ApprovalRefused(
            f"candidate {version.version} passed the policy and awaits a person: run "
            f"`llmops models approve {version.version}` (or set approve_version and approver in the "
            f"launchpad), then materialize approved_model again")
    return version


def decision_markdown(decision: policy.Decision, index: bool = False) -> str:
    """Every rule of the decision: value, threshold, passed."""
    return pd.DataFrame(decision.checks).to_markdown(index=index)


def registry_markdown(engine, newest: int = 10) -> str:
    """The registry's newest versions: stage, approver, dataset, last change."""
    versions = pd.DataFrame([{"version": v.version, "stage": v.stage, "approver": v.approver,
                              "dataset": v.dataset_version, "updated": str(v.updated_at)[:19]}
                             for v in registry.list_versions(engine)[:newest]])
    return versions.to_markdown(index=False)
