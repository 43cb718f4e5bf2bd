"""misalign.config_resources: what a trial holds (ResourceSettings) and what the plan's cost estimate assumes
(PlanSettings): their defaults and their bounds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from misalign.config_resources import PlanSettings, ResourceSettings


def test_resource_defaults_are_one_cpu_worker() -> None:
    r = ResourceSettings()
    assert (r.workers, r.cpus_per_worker, r.gpus_per_worker, r.placement) == (1, 1, 0, "PACK")
    assert r.max_concurrent is None and r.start_timeout_s == 1800


@pytest.mark.parametrize("bad", [{"workers": 0}, {"cpus_per_worker": 0}, {"gpus_per_worker": -1},
                                 {"placement": "SCATTER"}, {"max_concurrent": 0}, {"start_timeout_s": 0},
                                 {"workers": True}, {"gpu_per_worker": 1}])
def test_resource_bounds(bad: dict) -> None:
    with pytest.raises(ValidationError):
        ResourceSettings(**bad)


def test_fractional_gpus_are_allowed() -> None:
    assert ResourceSettings(gpus_per_worker=0.5, workers=2, placement="SPREAD").gpus_per_worker == 0.5


def test_plan_defaults_price_an_h100() -> None:
    p = PlanSettings()
    assert p.peak_flops == 989e12 and p.mfu == 0.35 and p.price_per_device_hour is None
    assert (p.devices_per_node, p.tokens_per_example, p.categories, p.model_configs) == (1, 300, 13, {})


@pytest.mark.parametrize("bad", [{"mfu": 0}, {"mfu": 1.5}, {"peak_flops": 0}, {"price_per_device_hour": -1},
                                 {"devices_per_node": 0}, {"tokens_per_example": 0}, {"categories": 0},
                                 {"peak_flops": float("inf")}])
def test_plan_bounds(bad: dict) -> None:
    with pytest.raises(ValidationError):
        PlanSettings(**bad)


def test_a_full_mfu_and_a_free_device_are_allowed() -> None:
    p = PlanSettings(mfu=1, price_per_device_hour=0, model_configs={"org/m": "configs/models/m.json"})
    assert p.mfu == 1 and p.price_per_device_hour == 0 and p.model_configs == {"org/m": "configs/models/m.json"}
