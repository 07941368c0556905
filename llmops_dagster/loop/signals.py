"""What the loop decides from production signals: drift of the production model's recent prompts
from its training prompts, and the post-deployment guard's verdict. The rows come from
llmops_dagster/serving/traffic_log.py and the reference embeddings from dataset/embeddings.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmops_dagster.dataset import embeddings
from llmops_dagster.loop.drift import DriftResult, drift_test
from llmops_dagster.prompts.rendering import embedding_text
from llmops_dagster.serving import traffic_log
from llmops_dagster.serving.traffic_log import LiveRate

GUARD = "rollback_guard"  # the actor of automatic rollbacks in the registry's audit log


@dataclass(frozen=True)
class DriftCheck:
    """One drift test of the newest window, or why there was none (`result` None)."""

    window_key: str | None  # model version @ newest prompt's time: names the window tested
    result: DriftResult | None
    reason: str


def check_production_drift(engine, embed: Callable, production, window: int, reference_size: int,
                           alpha: float, permutations: int, tested_window: str | None = None
                           ) -> DriftCheck:
    """Test the newest `window` prompts served by `production` against up to `reference_size`
    training-prompt embeddings of its dataset, once per new window: after a tested window
    (`tested_window`, "version@time of its newest prompt"), the next test waits for `window` new
    prompts, so windows never overlap and each prompt is tested once (alpha false alarms a window,
    not a tick)."""
    tested_version, _, tested_until = (tested_window or "").partition("@")
    if tested_version == production.version and tested_until:
        fresh = traffic_log.prompts_after(engine, production.version, tested_until)
        if fresh < window:
            return DriftCheck(tested_window, None, f"{fresh} new prompts since the window tested "
                                                   f"last (ending {tested_until}); a window is {window}")
    prompts, newest = traffic_log.recent_prompts(engine, production.version, window)
    if len(prompts) < window:
        return DriftCheck(None, None, f"{len(prompts)} prompts served by {production.version}; "
                                      f"the window is {window}")
    window_key = f"{production.version}@{newest}"
    reference = embeddings.reference_embeddings(engine, production.dataset_version, reference_size)
    if len(reference) < 2:
        return DriftCheck(window_key, None,
                          f"no dataset_embeddings for dataset {production.dataset_version}")
    # The same text the reference set embedded for each training example (rendering.py).
    result = drift_test(embed([embedding_text(p) for p in prompts]), reference, alpha=alpha,
                        permutations=permutations)
    verdict = "drift" if result.drifted else "no drift"
    return DriftCheck(window_key, result, f"{verdict}: statistic {result.statistic:.5f} vs threshold "
                                          f"{result.threshold:.5f} (p {result.p_value:.3f})")


def guard_verdict(new: LiveRate, previous: LiveRate, margin: float, min_ratings: int,
                  min_actors: int = 5) -> str | None:
    """Why the new version must be rolled back, or None: its negative rate exceeds the previous
    version's by more than `margin`, over at least `min_ratings` counted ratings of each from at
    least `min_actors` actors of each (one actor alone never rolls a version back)."""
    if new.ratings < min_ratings or previous.ratings < min_ratings:
        return None
    if new.actors < min_actors or previous.actors < min_actors:
        return None
    if new.negative_rate > previous.negative_rate + margin:
        return (f"live negative-feedback rate of {new.version} is {new.negative_rate:.1%} over "
                f"{new.ratings} ratings from {new.actors} actors, above {previous.version}'s "
                f"{previous.negative_rate:.1%} over {previous.ratings} from {previous.actors} by more "
                f"than the margin {margin:.1%}")
    return None
