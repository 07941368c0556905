"""Which models an eval report scores: the candidate, its base model, and the production champion
when there is one other than the candidate itself."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Contenders:
    models: dict[str, str]  # role (candidate, base, champion) -> a from_pretrained folder
    champion_version: str | None  # the champion scored (stored in eval_reports), None without one
    champion_label: str  # what the report says about the champion


def choose_contenders(candidate_version: str, candidate_path: str, base_model_path: str,
                      production) -> Contenders:
    """The models to score: the candidate and its base model, and `production` (a
    registry.ModelVersion, or None) as champion unless it is the candidate itself."""
    models = {"candidate": candidate_path, "base": base_model_path}
    if production is None:
        return Contenders(models=models, champion_version=None, champion_label="none (first model)")
    if production.version == candidate_version:
        return Contenders(models=models, champion_version=None, champion_label=(
            f"{production.version} (the candidate itself, already in production)"))
    return Contenders(models={**models, "champion": production.merged_model_path},
                      champion_version=production.version, champion_label=production.version)
