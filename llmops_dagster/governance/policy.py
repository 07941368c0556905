"""The approval policy: which candidate may become the production model, and why not.

Pure functions over an eval report's numbers, so the policy can be tested without models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmops_dagster.evaluation import complaints
from llmops_dagster.evaluation.scoring import lowest_slice

NO_IMPROVEMENT = "no improvement: "  # how the reason of a candidate refused by `improvement` starts


@dataclass(frozen=True)
class Policy:
    """Thresholds on the candidate and the margin it may lose to the champion by."""

    min_token_f1: float = field(default=0.5, metadata={"help": "Lowest accepted candidate token F1."})
    min_exact_match: float = field(default=0.0, metadata={"help": "Lowest accepted exact-match rate."})
    max_loss: float = field(default=3.0, metadata={
        "help": "Highest accepted eval loss (nats per answer token)."})
    # Retrains of the default model that differ only in seed reach -0.0054 at worst on 215 eval
    # examples (benchmarks/bench_quality.py); 0.02 leaves room for smaller eval sets and other machines.
    margin: float = field(default=0.02, metadata={
        "help": "The bootstrap 95% lower bound of candidate minus champion token F1 must exceed "
        "-margin (a retrain that differs only in seed stays above -0.006: benchmarks/bench_quality.py)."})
    min_slice_exact_match: float = field(default=0.0, metadata={
        "help": "Lowest accepted exact-match rate on every slice of the trusted eval split (0: off). "
        "The average can hide a slice the model gets wrong; the default data's slices all reach "
        "0.8 on fresh questions (benchmarks/bench_quality.py); your own data's slices may not."})
    require_trusted_no_regression: bool = field(default=True, metadata={
        "help": "Gate on the trusted eval split alone and report the feedback-derived slice for "
        "information; when false, the candidate must not regress by more than margin on the "
        "feedback slice either (when it has examples)."})
    min_complaint_improvement: float = field(default=0.1, metadata={
        "help": "With approved_model.require_improvement (the loop's retrains): the candidate's "
        "`fixed` share on the complaint slice (down-voted answers of production it answers "
        "differently, with the accepted correction when there is one) minus the champion's must "
        "be at least this, on at least min_complaint_examples examples; otherwise the candidate "
        "is rejected as 'no improvement' and production stays. 0.1: one more complaint in ten "
        "fixed."})
    min_complaint_examples: int = field(default=5, metadata={
        "ge": 1, "help": "Fewest complaint examples (held out from the candidate's training) "
        "on which the loop's retrain can show an improvement; fewer is no new signal: no new "
        "version."})


@dataclass
class Decision:
    passed: bool
    failures: list[str] = field(default_factory=list)  # each names the metric, threshold and gap
    checks: list[dict] = field(default_factory=list)  # every rule, passed or not

    def message(self) -> str:
        return "; ".join(self.failures) if self.failures else "every rule of the policy passed"


def judge(policy: Policy, candidate: dict, comparison: dict | None,
          upstream_checks_failed: list[str] | None = None,
          feedback_comparison: dict | None = None, candidate_slices: dict | None = None) -> Decision:
    """Apply the policy to the candidate's metrics and, when there is a champion, the paired
    bootstrap of candidate minus champion on the trusted split; `feedback_comparison` is the same
    bootstrap on the feedback-derived slice (None without a champion or feedback examples);
    `candidate_slices` the candidate's metrics per slice of the trusted split. A first model (no
    champion) is judged on thresholds."""
    decision = Decision(passed=True)

    def rule(name: str, value: float, threshold: float, at_least: bool) -> None:
        ok = value >= threshold if at_least else value <= threshold
        gap = abs(value - threshold)
        decision.checks.append({"rule": name, "value": round(value, 4), "threshold": threshold,
                                "passed": ok})
        if not ok:
            word = "below" if at_least else "above"
            decision.failures.append(f"{name} {value:.4f} is {word} the threshold {threshold:.4f} "
                                     f"(gap {gap:.4f})")

    rule("token_f1", candidate["token_f1"], policy.min_token_f1, at_least=True)
    rule("exact_match", candidate["exact_match"], policy.min_exact_match, at_least=True)
    rule("loss", candidate["loss"], policy.max_loss, at_least=False)
    weakest = lowest_slice(candidate_slices or {})
    if policy.min_slice_exact_match > 0 and weakest is not None:
        rule(f"exact_match on the lowest slice ({weakest[0]})", weakest[1], policy.min_slice_exact_match,
             at_least=True)
    if comparison:
        rule(f"{comparison.get('metric', 'token_f1')} vs champion (bootstrap 95% lower bound)",
             comparison["ci_low"], -policy.margin, at_least=True)
    if feedback_comparison:
        name = (f"{feedback_comparison.get('metric', 'token_f1')} vs champion on the feedback slice "
                f"(bootstrap 95% lower bound)")
        if policy.require_trusted_no_regression:
            decision.checks.append({"rule": name, "value": round(feedback_comparison["ci_low"], 4),
                                    "threshold": "informational", "passed": True})
        else:
            rule(name, feedback_comparison["ci_low"], -policy.margin, at_least=True)
    for check in upstream_checks_failed or []:
        decision.failures.append(f"upstream blocking check failed: {check}")
        decision.checks.append({"rule": f"upstream check {check}", "value": "failed",
                                "threshold": "passed", "passed": False})
    decision.passed = not decision.failures
    return decision


@dataclass(frozen=True)
class Improvement:
    """Whether a candidate improves on the champion where users complained (`improvement`)."""

    improved: bool
    reason: str  # starts with NO_IMPROVEMENT when not improved
    figures: dict  # examples, fixed by role, difference, thresholds
    check: dict  # the rule as a row of Decision.checks


def improvement(policy: Policy, complaint_slice: dict) -> Improvement:
    """The rule of a loop retrain: candidate `fixed` minus champion `fixed` on the complaint slice
    (complaints.read_slice) at least min_complaint_improvement, on at least min_complaint_examples
    examples."""
    difference = complaints.fixed_difference(complaint_slice)
    metrics = complaint_slice.get("metrics") or {}
    figures = {"complaint_examples": complaint_slice["examples"],
               "candidate_fixed": (metrics.get("candidate") or {}).get("fixed"),
               "champion_fixed": (metrics.get("champion") or {}).get("fixed"),
               "fixed_difference": difference,
               "min_complaint_improvement": policy.min_complaint_improvement,
               "min_complaint_examples": policy.min_complaint_examples}
    rule = "fixed vs champion on the complaint slice"
    if complaint_slice["examples"] < policy.min_complaint_examples or difference is None:
        reason = NO_IMPROVEMENT + (
            f"no new signal: {complaint_slice['examples']} complaint examples held out from the "
            f"candidate's training, fewer than min_complaint_examples {policy.min_complaint_examples}"
            if complaint_slice["examples"] < policy.min_complaint_examples
            else "the champion was not scored on the complaint slice")
        return Improvement(False, reason, figures, {
            "rule": f"complaint examples (at least {policy.min_complaint_examples})",
            "value": complaint_slice["examples"], "threshold": policy.min_complaint_examples,
            "passed": False})
    improved = difference >= policy.min_complaint_improvement - 1e-9  # shares are rounded to 4 places
    reason = (f"fixed {figures['candidate_fixed']:.4f} (candidate) vs {figures['champion_fixed']:.4f} "
              f"(champion) on {complaint_slice['examples']} complaint examples: {difference:+.4f}, "
              f"{'at least' if improved else 'below'} min_complaint_improvement "
              f"{policy.min_complaint_improvement:.4f}")
    return Improvement(improved, reason if improved else NO_IMPROVEMENT + reason, figures,
                       {"rule": rule, "value": difference, "threshold": policy.min_complaint_improvement,
                        "passed": improved})
