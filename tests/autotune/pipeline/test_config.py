from __future__ import annotations

import pytest

from autotune.pipeline.config import CalibrationConfig, SearchConfig, TuneConfig
from autotune.tuner import autotune
from tests.conftest import make_tiny_bert


def test_keywords_are_dealt_to_their_groups() -> None:
    config = TuneConfig.from_kwargs(
        "cpu", seq_len=32, heldout_windows=4, search="allocator", seed=3, runtime="torch"
    )
    assert config.target == "cpu" and config.runtime == "torch"
    assert config.calibration == CalibrationConfig(seq_len=32, heldout_windows=4)
    assert config.search == SearchConfig(search="allocator", seed=3)


def test_an_unknown_keyword_is_refused_as_python_refuses_it() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'sead'"):
        TuneConfig.from_kwargs("cpu", sead=3)
    with pytest.raises(TypeError, match="'calibration_window'"):
        autotune(make_tiny_bert(), "50%", "cpu", calibration_window=4)


def test_a_config_object_and_its_keywords_give_the_same_plan(tokenizer) -> None:
    small = {"seq_len": 32, "calibration_windows": 8, "sensitivity_windows": 2}
    keywords = {**small, "heldout_windows": 4, "search": "allocator", "cache": False}
    by_keywords = autotune(
        make_tiny_bert(), "40%", "cpu", tokenizer=tokenizer, progress=False, **keywords
    )
    config = TuneConfig(
        target="cpu",
        progress=False,
        calibration=CalibrationConfig(**small, heldout_windows=4),
        search=SearchConfig(search="allocator", cache=False),
    )
    by_config = autotune(make_tiny_bert(), "40%", tokenizer=tokenizer, config=config)
    assert by_config.plan.layers == by_keywords.plan.layers
    assert by_config.plan.predicted == by_keywords.plan.predicted


def test_settings_in_a_config_and_as_keywords_at_once_are_refused() -> None:
    with pytest.raises(TypeError, match="not both"):
        autotune(make_tiny_bert(), "50%", "cpu", config=TuneConfig())
    with pytest.raises(TypeError, match="not both"):
        autotune(make_tiny_bert(), "50%", config=TuneConfig(), seed=2)
