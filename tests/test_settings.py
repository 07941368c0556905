"""One source for every default: each setting that appears both in a library declaration (a
dataclass field with help text) and in a Dagster config, the training run file or the serving config
has the same default and description in each. Pure Python: no database, no processes."""

import dataclasses

import pytest

from assets.dataset import ValidatedDatasetConfig
from assets.governance import ApprovalConfig
from assets.serving import ServingDeploymentConfig
from assets.training import BaseModelConfig, FinetuneConfig
from llmops_dagster.dataset.validation import ValidationRules
from llmops_dagster.governance.policy import Policy
from llmops_dagster.serving.app import ServingConfig
from llmops_dagster.training.base_model import ScratchModelSpec
from llmops_dagster.training.run_config import FinetuneSettings, RunConfig

# Dagster config class -> the library dataclass that declares its settings.
DERIVED = [
    (BaseModelConfig, ScratchModelSpec),
    (FinetuneConfig, FinetuneSettings),
    (ApprovalConfig, Policy),
    (ValidatedDatasetConfig, ValidationRules),
    (ServingDeploymentConfig, ServingConfig),
]


def default_of(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def declared_settings(declaration) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(declaration) if "help" in f.metadata}


@pytest.mark.parametrize(("config", "declaration"), DERIVED, ids=lambda c: c.__name__)
def test_dagster_config_takes_default_and_description_from_the_declaration(config, declaration):
    settings = declared_settings(declaration)
    shared = set(config.model_fields) & set(settings)
    assert shared, f"{config.__name__} shares no setting with {declaration.__name__}"
    for name in sorted(shared):
        field = config.model_fields[name]
        assert field.get_default(call_default_factory=True) == default_of(settings[name]), name
        assert field.description == settings[name].metadata["help"], name


@pytest.mark.parametrize(("config", "declaration"), DERIVED, ids=lambda c: c.__name__)
def test_every_declared_setting_is_in_the_launchpad(config, declaration):
    hidden = set(declared_settings(declaration)) - set(config.model_fields)
    assert not hidden, f"{sorted(hidden)} cannot be set in the launchpad"


def test_run_file_and_serving_config_use_the_same_declarations():
    run_defaults = {f.name: default_of(f) for f in dataclasses.fields(RunConfig)}
    for name, field in declared_settings(FinetuneSettings).items():
        assert run_defaults[name] == default_of(field), name
    assert ServingConfig.seq_len == FinetuneSettings.seq_len


def test_default_config_loads_in_dagster():
    """Dagster accepts the derived fields (default factories included) as its config schema."""
    finetune = FinetuneConfig()
    assert finetune.target_modules == default_of(declared_settings(FinetuneSettings)["target_modules"])
    assert finetune.max_steps == FinetuneSettings.max_steps
    assert ApprovalConfig().margin == Policy.margin
