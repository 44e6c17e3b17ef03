"""extend-context's model after the extension: DCA's default split and LongRoPE's derived factors."""

from __future__ import annotations

import pytest

from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import yarn_as_longrope
from llm_lifecycle.models.presets import load_preset
from llm_lifecycle.workflows.runner.settings import ConfigError
from llm_lifecycle.workflows.stages.extend_context import ExtendContextSettings

UPSTREAM = {"seq_len": 256, "model": load_preset("llama-small")}


def test_dca_window_defaults_to_the_rest_of_the_trained_length():
    fields = ExtendContextSettings(seq_len=1024, dca_chunk=192).long_model(UPSTREAM)
    assert (fields["dca_chunk"], fields["dca_local_window"], fields["max_seq_len"]) == (192, 64, 1024)
    assert ExtendContextSettings(seq_len=1024, dca_chunk=64).long_model(UPSTREAM)["dca_local_window"] == 64  # <= chunk
    ModelConfig.from_dict(fields).validate()
    with pytest.raises(ConfigError, match=r"dca_chunk \+ dca_local_window \(288\) must not exceed .* \(256\)"):
        ExtendContextSettings(seq_len=1024, dca_chunk=192, dca_local_window=96).check("stages.x", UPSTREAM)


def test_longrope_without_factors_gets_yarns_ramp_and_given_factors_are_kept():
    fields = ExtendContextSettings(seq_len=1024, rope_theta=10_000.0,
                                   rope_scaling={"type": "longrope", "factor": 4.0}).long_model(UPSTREAM)
    scaling = fields["rope_scaling"]
    expected = yarn_as_longrope(ModelConfig.from_dict(fields), 4.0, 256)
    assert scaling["original_max_seq_len"] == 256 and scaling["long_factor"] == expected["long_factor"]
    assert set(scaling["short_factor"]) == {1.0} and len(scaling["long_factor"]) == 16  # head_dim 32 / 2
    given = {"type": "longrope", "factor": 4.0, "short_factor": [1.5] * 16, "long_factor": [3.0] * 16}
    assert ExtendContextSettings(seq_len=1024, rope_scaling=given).long_model(UPSTREAM)["rope_scaling"]["long_factor"] == [3.0] * 16
