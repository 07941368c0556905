"""serving_deployment's config refuses a batching setting a replica would refuse, before any
deploy, naming the setting (no Ray, no database)."""

import dagster as dg
import pytest

from assets.serving import ServingDeploymentConfig


@pytest.mark.parametrize(("setting", "value"), [("max_batch_size", 0), ("max_batch_size", -3),
                                                ("batch_wait_timeout_s", -0.5)])
def test_a_batching_setting_out_of_bounds_is_refused_by_name(setting, value):
    with pytest.raises(dg.Failure, match=rf"serving_deployment\.{setting} must be at least"):
        ServingDeploymentConfig(**{setting: value}).check("127.0.0.1")


def test_the_defaults_pass():
    ServingDeploymentConfig().check("127.0.0.1")
    ServingDeploymentConfig(max_batch_size=1, batch_wait_timeout_s=0).check("127.0.0.1")
