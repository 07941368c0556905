"""Thresholds and windows of the automation that closes the loop (typed; the sensors read them)."""

import copy

import dagster as dg
from pydantic import Field

from llmops_dagster.infra.settings import declared_default
from llmops_dagster.training.plan import WarmStartSettings

# The loop's retrains (sensors and the nightly schedule) promote a new version only when it improves
# what users complained about (approved_model.require_improvement); a person's run need not.
RETRAIN_APPROVAL = {"approved_model": {"config": {"require_improvement": True}}}


class LoopSettings(dg.ConfigurableResource):
    feedback_threshold: int = Field(default=20, ge=1, description="New counted negative votes on the "
                                    "production model that trigger a retraining (each actor's "
                                    "ratings count at most max_votes_per_actor times).")
    # One actor is one vote: a key, or for a rating without a key whoever asked (their key, else
    # their address), however many feedback tokens they hold. With the defaults a retrain needs
    # at least 7 actors (20 votes at 3 each), a rollback at least 5 on each version.
    min_distinct_raters: int = Field(default=5, ge=2, description="Distinct actors behind a "
                                     "feedback window, and behind each version's live rate, before "
                                     "the loop retrains or rolls back (one actor alone never does).")
    max_votes_per_actor: int = Field(default=3, ge=1, description="Most ratings of one actor that "
                                     "count in a feedback window or a live rate; the rest are stored "
                                     "and not counted.")
    drift_window: int = Field(default=200, description="Newest production prompts compared (count).")
    drift_reference: int = Field(default=2000, description="Training-prompt embeddings compared.")
    # One test per new window of drift_window prompts: at 1 request a second that is 432 tests a day,
    # so alpha 0.01 gives about 4.3 false alarms a day, of which the cooldown lets at most 4 retrain
    # (and a retrain on unchanged data reproduces the production model: "no change", no deploy).
    drift_alpha: float = Field(default=0.01, description="Target false-alarm rate of one drift test "
                               "(one test per new window of drift_window prompts).")
    drift_permutations: int = Field(default=500, description="Shuffles calibrating the threshold "
                                    "(at least 5 / drift_alpha).")
    drift_cooldown_s: int = Field(default=6 * 3600, description="No drift retrain within this many "
                                  "seconds of the last retrain run (any trigger).")
    guard_margin: float = Field(default=0.1, description="Roll back when the new version's negative "
                                "rate exceeds the previous one's by more than this.")
    guard_min_ratings: int = Field(default=20, ge=1, description="Counted ratings of each version "
                                   "(at most max_votes_per_actor an actor) before judging.")
    # A sensor's retrain continues from the production adapter for fewer steps: 800 steps from a
    # fresh init are ~51 s of the 2-core machine's minute from trigger to served model. The nightly
    # schedule trains from a fresh init at the asset's defaults.
    retrain_warm_start: bool = Field(default=True, description="Sensor-triggered retrains start "
                                     "from the production model's adapter (finetuned_checkpoint.warm_start).")
    retrain_steps: int = Field(default=declared_default(WarmStartSettings, "warm_start_steps"), ge=1,
                               description="Optimizer steps of a sensor-triggered warm-started "
                               "retrain (finetuned_checkpoint.warm_start_steps).")
    max_requests_per_decision: int = Field(
        default=3, ge=1, description="Times a sensor requests one decision (a feedback or drift "
        "window) whose runs were all lost to failures outside them (a dead run worker), counting "
        "the first request; each run is also retried by the daemon (retrain job's dagster/max_retries).")

    def retrain_run_config(self) -> dict:
        """The run config of a sensor's retrain: approved_model promotes only an improvement on the
        complaint slice (RETRAIN_APPROVAL), and the fine-tune is a warm start for retrain_steps,
        checkpointed every quarter of them (a retry after a dead run worker loses at most a
        quarter), or at the asset's defaults (FinetuneSettings.max_steps and checkpoint_every)
        when retrain_warm_start is off."""
        ops = copy.deepcopy(RETRAIN_APPROVAL)
        if self.retrain_warm_start:
            ops["finetuned_checkpoint"] = {"config": {
                "warm_start": True, "warm_start_steps": self.retrain_steps,
                "checkpoint_every": max(1, self.retrain_steps // 4)}}
        return {"ops": ops}

    def drift_test(self) -> dict:
        """The drift test's settings, as signals.check_production_drift takes them."""
        return {"window": self.drift_window, "reference_size": self.drift_reference,
                "alpha": self.drift_alpha, "permutations": self.drift_permutations}
