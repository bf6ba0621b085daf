"""Settings of the method (method.md): the paper's defaults, and a named error for every bad one."""

from __future__ import annotations

import dataclasses
import math

import pytest

from bf_core.config import BFConfig, IdAFConfig, IdAPConfig, resolve_step
from bf_core.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Defaults: the paper, section 4.1
# --------------------------------------------------------------------------------------------


def test_idaf_defaults_are_the_papers():
    config = IdAFConfig()
    assert (config.lambda_id, config.lambda_sem) == (5.0, 1.0)
    assert config.lambda_mode == "temperature"  # eq. 9: lambda inside the softmax
    assert (config.smoothing, config.smooth_kernel) == ("avgpool", 4)
    assert config.saliency == "guided"


def test_idap_defaults_are_the_papers():
    config = IdAPConfig()
    assert config.num_tokens == 8
    assert config.seed == 0
    assert config.temperature is None  # eq. 11 has no 1/sqrt(D)
    assert config.negative == "aggregate"
    assert config.query_file is None


def test_top_level_defaults():
    config = BFConfig()
    assert config.enabled and config.use_idaf and config.use_idap
    assert config.semantic_adapters == "off"  # the semantic line is base SDXL
    assert config.share_negative is False
    assert config.idaf == IdAFConfig() and config.idap == IdAPConfig()


@pytest.mark.parametrize(("num_steps", "expected"), [(50, (10, 15)), (4, (1, 1)), (30, (6, 9)),
                                                     (8, (2, 2)), (100, (20, 30))])
def test_default_thresholds_keep_the_papers_shape_at_any_step_count(num_steps, expected):
    """M1 = 10 and M2 = 15 at 50 steps (section 4.1), as fractions 0.2 and 0.3 of T."""
    assert BFConfig().thresholds(num_steps) == expected


def test_integer_thresholds_are_step_indices():
    config = BFConfig(idaf_start=10, idap_start=15)
    assert config.thresholds(50) == (10, 15)
    assert config.thresholds(17) == (10, 15)
    assert BFConfig(idaf_start=0, idap_start=0.0).thresholds(4) == (0, 0)


def test_component_settings_compose_into_the_top_level_config():
    custom = BFConfig(idaf=IdAFConfig(lambda_id=3.0), idap=IdAPConfig(num_tokens=4))
    assert custom.idaf.lambda_id == 3.0 and custom.idap.num_tokens == 4
    assert BFConfig().idaf.lambda_id == 5.0


@pytest.mark.parametrize("config", [IdAFConfig(), IdAPConfig(), BFConfig()],
                         ids=lambda c: type(c).__name__)
def test_configs_are_frozen(config):
    field_name = dataclasses.fields(config)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, field_name, getattr(config, field_name))


def test_configs_can_be_varied_with_replace_and_are_validated_again():
    config = dataclasses.replace(IdAFConfig(), lambda_id=8.0)
    assert config.lambda_id == 8.0
    with pytest.raises(ConfigError, match="lambda_id"):
        dataclasses.replace(IdAFConfig(), lambda_id=-1.0)


# --------------------------------------------------------------------------------------------
# Every bad setting: ConfigError (a ValueError) naming the field and the allowed range
# --------------------------------------------------------------------------------------------

BAD_NUMBERS = [0, 0.0, -1.0, math.nan, math.inf, -math.inf, True, False, "5", None]

BAD_SETTINGS = [
    *[(IdAFConfig, {"lambda_id": v}, "IdAFConfig.lambda_id", "> 0") for v in BAD_NUMBERS],
    *[(IdAFConfig, {"lambda_sem": v}, "IdAFConfig.lambda_sem", "> 0") for v in BAD_NUMBERS],
    (IdAFConfig, {"lambda_mode": "softmax"}, "IdAFConfig.lambda_mode", "'temperature', 'weight'"),
    (IdAFConfig, {"smoothing": "gaussian"}, "IdAFConfig.smoothing",
     "'avgpool', 'downup', 'none'"),
    (IdAFConfig, {"smoothing": None}, "IdAFConfig.smoothing", "'avgpool', 'downup', 'none'"),
    (IdAFConfig, {"saliency": "eps"}, "IdAFConfig.saliency", "'guided', 'cfg_delta'"),
    *[(IdAFConfig, {"smooth_kernel": v}, "IdAFConfig.smooth_kernel", ">= 1")
      for v in (0, -4, 4.0, True, "4")],
    *[(IdAPConfig, {"num_tokens": v}, "IdAPConfig.num_tokens", ">= 1")
      for v in (0, -8, 8.0, True)],
    *[(IdAPConfig, {"seed": v}, "IdAPConfig.seed", ">= 0") for v in (-1, 0.5, True, "0")],
    *[(IdAPConfig, {"temperature": v}, "IdAPConfig.temperature", "> 0")
      for v in (0.0, -2.0, math.nan, math.inf, True, "sqrt", "sqrt_D")],
    (IdAPConfig, {"negative": "uncond"}, "IdAPConfig.negative", "'aggregate', 'zeros'"),
    *[(BFConfig, {"semantic_adapters": v}, "BFConfig.semantic_adapters", "'off', 'on'")
      for v in ("none", True, False)],
    *[(BFConfig, {"idaf_start": v}, "BFConfig.idaf_start", "[0, 1)")
      for v in (1.0, 1.5, -0.1, math.nan, math.inf, True, "0.2", None)],
    *[(BFConfig, {"idap_start": v}, "BFConfig.idap_start", "[0, 1)")
      for v in (1.0, -0.5, math.nan, False)],
    (BFConfig, {"idaf_start": -1}, "BFConfig.idaf_start", ">= 0"),
    (BFConfig, {"idap_start": -3}, "BFConfig.idap_start", ">= 0"),
    *[(BFConfig, {name: "yes"}, f"BFConfig.{name}", "True or False")
      for name in ("enabled", "use_idaf", "use_idap", "share_negative")],
    (BFConfig, {"idaf": {"lambda_id": 5}}, "BFConfig.idaf", "IdAFConfig"),
    (BFConfig, {"idap": IdAFConfig()}, "BFConfig.idap", "IdAPConfig"),
]


@pytest.mark.parametrize(("cls", "settings", "field_name", "allowed"), BAD_SETTINGS,
                         ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_bad_setting_is_refused_naming_the_field_and_the_allowed_range(
        cls, settings, field_name, allowed):
    with pytest.raises(ConfigError) as raised:
        cls(**settings)
    assert isinstance(raised.value, ValueError)
    message = str(raised.value)
    assert field_name in message, message
    assert allowed in message, message


@pytest.mark.parametrize("value", [1e-6, 0.5, 5, 100.0])
def test_any_finite_positive_lambda_is_accepted(value):
    config = IdAFConfig(lambda_id=value, lambda_sem=value)
    assert config.lambda_id == value


@pytest.mark.parametrize("value", [None, 0.25, 2, "sqrt_d"])
def test_idap_temperature_accepts_none_a_positive_number_or_sqrt_d(value):
    assert IdAPConfig(temperature=value).temperature == value


def test_smooth_kernel_of_one_and_large_kernels_are_valid_settings():
    assert IdAFConfig(smooth_kernel=1).smooth_kernel == 1
    assert IdAFConfig(smooth_kernel=8).smooth_kernel == 8


# --------------------------------------------------------------------------------------------
# Thresholds that only make sense once the step count is known
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field_name", ["idaf_start", "idap_start"])
@pytest.mark.parametrize("offset", [0, 5, -1])
def test_int_threshold_at_or_beyond_the_last_step_is_refused_naming_the_field(field_name, offset):
    """A component runs at steps i > M, so an int M >= T - 1 would silently never run."""
    num_steps = 20
    config = BFConfig(**{field_name: num_steps + offset})
    with pytest.raises(ConfigError) as raised:
        config.thresholds(num_steps)
    message = str(raised.value)
    assert f"BFConfig.{field_name}={num_steps + offset}" in message
    assert "[0, 18]" in message  # the ints that do run in a 20-step schedule


def test_int_threshold_before_the_last_step_is_accepted():
    assert BFConfig(idaf_start=18, idap_start=0).thresholds(20) == (18, 0)


def test_resolve_step_rounds_fractions_to_the_nearest_step():
    assert resolve_step("M", 0.2, 8) == 2  # 1.6
    assert resolve_step("M", 0.3, 8) == 2  # 2.4
    assert resolve_step("M", 0.0, 8) == 0
    with pytest.raises(ConfigError, match=r"M as a fraction .* \[0, 1\)"):
        resolve_step("M", 1.2, 8)
