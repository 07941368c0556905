"""One source for every default: each setting that appears both in a library declaration (a
dataclass field with help text) and in a Dagster config, the training run file or the serving config
has the same default and description in each. Pure Python: no database, no processes."""

import dataclasses

import pydantic
import pytest

from assets.dataset import ValidatedDatasetConfig
from assets.evaluation import EvalConfig
from assets.governance import ApprovalConfig
from assets.serving import ServingDeploymentConfig
from assets.training import BaseModelConfig, FinetuneConfig
from llmops_dagster.dataset.validation import ValidationRules
from llmops_dagster.evaluation import scoring
from llmops_dagster.evaluation.scoring import EvalSettings
from llmops_dagster.governance.approval import ApprovalRequest
from llmops_dagster.governance.policy import Policy
from llmops_dagster.infra.settings import copy_into, declared_default
from llmops_dagster.serving.app import ServingConfig
from llmops_dagster.training.base_model import ScratchModelSpec
from llmops_dagster.training.plan import WarmStartSettings
from llmops_dagster.training.run_config import FinetuneSettings, RunConfig
from resources.loop_settings import LoopSettings

# Dagster config class -> the library dataclass that declares its settings.
DERIVED = [
    (BaseModelConfig, ScratchModelSpec),
    (FinetuneConfig, FinetuneSettings),
    (FinetuneConfig, WarmStartSettings),
    (EvalConfig, EvalSettings),
    (ApprovalConfig, Policy),
    (ApprovalConfig, ApprovalRequest),
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


def test_other_components_follow_the_declarations():
    """The loop's warm-start retrain and evaluate()'s defaults take the declared values."""
    assert LoopSettings().retrain_steps == declared_default(WarmStartSettings, "warm_start_steps")
    defaults = scoring.evaluate.__defaults__
    assert defaults == (EvalSettings.max_feedback_examples, EvalSettings.batch_size)


@pytest.mark.parametrize(("name", "value"), [
    ("checkpoint_every", 0), ("max_steps", 0), ("seq_len", 0), ("lora_r", 0), ("lora_alpha", 0),
    ("lora_dropout", 1.0), ("seed", -1), ("warm_start_steps", 0)])
def test_config_validation_refuses_a_setting_out_of_its_bounds(name, value):
    """A bound declared in the library reaches the launchpad: checkpoint_every=0 never reaches
    `step % checkpoint_every` in the ranks."""
    with pytest.raises(pydantic.ValidationError, match=name):
        FinetuneConfig(**{name: value})


def test_a_run_with_checkpoint_every_0_fails_config_validation_naming_the_field(tmp_path):
    """Dagster builds the config before the asset body runs: nothing is planned or launched."""
    import dagster as dg

    from assets.training import finetuned_checkpoint
    from resources.artifacts import ArtifactStore
    from resources.database import PostgresResource
    from resources.trainer import TrainerResource

    result = dg.materialize(
        [finetuned_checkpoint], raise_on_error=False,
        resources={"artifacts": ArtifactStore(root=str(tmp_path)), "trainer": TrainerResource(),
                   "database": PostgresResource()},
        run_config={"ops": {"finetuned_checkpoint": {"config": {"checkpoint_every": 0}}}})
    [failure] = [event for event in result.all_events if event.is_step_failure]
    error = failure.step_failure_data.error
    assert "checkpoint_every" in error.message + "".join(
        cause.message for cause in [error.cause] if cause is not None)
    assert not list(tmp_path.rglob("train_config.json"))


def test_copy_into_takes_every_field_by_name():
    config = ApprovalConfig(margin=0.5, mode="human", approver="ada")
    assert copy_into(config, Policy) == Policy(margin=0.5)
    assert copy_into(config, ApprovalRequest, approver="bob") == ApprovalRequest(mode="human",
                                                                                  approver="bob")
