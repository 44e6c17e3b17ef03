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


@pytest.mark.slow
def test_training_free_dca_stage_keeps_the_trained_length_and_registers_the_dca_model(workspace):
    """extend-context with steps: 0 and DCA: no training, the model as before within the
    trained length (chunk 48 + window 16 = 64), its config carrying DCA for every later stage."""
    from conftest import TINY_OVERRIDES
    from llm_lifecycle.models.load import load_model
    from llm_lifecycle.workflows.runner.pipeline import run_pipeline
    from llm_lifecycle.workflows.runner.recipe import load_recipe
    from llm_lifecycle.workflows.runner.stage import SilentProgress

    recipe = load_recipe("llama-small", [*TINY_OVERRIDES, "extend-context.steps=0", "extend-context.dca_chunk=48",
                                         "extend-context.rope_scaling=null", "extend-context.rope_theta=10000",
                                         "extend-context.passkey_trials=2"])  # the recipe's YaRN and base off
    stages = ["data-fetch", "data-clean", "tokenizer-train", "tokenize", "pretrain", "extend-context"]
    result = run_pipeline(recipe, workspace, SilentProgress(), stages=stages)["extend-context"]
    metrics = result.metrics
    assert metrics["ppl_after_64"] == pytest.approx(metrics["ppl_before_64"], rel=1e-6)
    assert metrics["ppl_after_128"] != metrics["ppl_before_128"]  # past 64 DCA re-positions
    assert "final_loss" not in metrics and "passkey_after_128.accuracy" in metrics  # generated through DCA's cache
    model, _ = load_model(result.model_dir)
    assert (model.cfg.dca_chunk, model.cfg.dca_local_window, model.cfg.max_seq_len) == (48, 16, 128)
