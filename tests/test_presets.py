"""Every small preset trains through the generic recipe, all in one workspace (the data and
tokenizer stages run once and are reused from their fingerprints); the full-size presets
are only counted, never built, and match their published sizes."""

from __future__ import annotations

import os

import pytest

from conftest import TINY_OVERRIDES
from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.presets import list_presets, load_preset
from llm_lifecycle.workflows.runner.pipeline import plan, run_pipeline
from llm_lifecycle.workflows.runner.recipe import load_recipe
from llm_lifecycle.workflows.stages import DEFAULT_CHAIN

STAGE_ORDER = list(DEFAULT_CHAIN)
from llm_lifecycle.workflows.runner.stage import SilentProgress

SMALL = [p for p in list_presets() if p.endswith("-small")]
# A recipe option a preset is made for (the objective is a pretrain setting, not a model
# field), and MLA's own head sizes in place of the tiny run's head_dim and GQA.
TINY_MLA = ["model.n_kv_heads=4", "model.head_dim=null", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
            "model.v_head_dim=16", "model.kv_lora_rank=32"]
PRESET_OVERRIDES = {
    "chatglm-small": ["pretrain.objective=glm_blank_infilling"],
    "deepseek-v2-small": TINY_MLA,
    "deepseek-v3-small": [*TINY_MLA, "model.q_lora_rank=48"],
    "gemma2-small": ["model.sliding_window=[32, null]", "model.query_pre_attn_scalar=16"],  # one window per tiny layer
    "phi3-small-small": ["model.query_pre_attn_scalar=256"],  # muP's 1 / head_dim at the tiny head_dim 16
}
# The one preset the default run takes through every stage; the slow test runs them all.
FULL_IN_DEFAULT_RUN = "chatglm-small"

# Published totals (reports / model cards), parameters: total, and active for MoE.
PUBLISHED = {
    "llama2-7b": (6.74e9, None),
    "llama3-8b": (8.03e9, None),
    "qwen2-7b": (7.62e9, None),
    "mistral-7b": (7.24e9, None),
    "mixtral-8x7b": (46.7e9, 12.9e9),
    "gemma-7b": (8.54e9, None),
    "phi-2": (2.78e9, None),
    "qwen3-30b-a3b": (30.5e9, 3.3e9),
    "deepseek-v2": (236e9, 21e9),
    "deepseek-v3": (671e9, 37e9),
    "yi-6b": (6.06e9, None),
    "yi-34b": (34.39e9, None),
    "internlm2-7b": (7.74e9, None),
    "qwen2.5-72b": (72.7e9, None),
    "qwen2-57b-a14b": (57.4e9, 14e9),
    "glm4-9b": (9.4e9, None),
    "phi3-mini": (3.82e9, None),
    "baichuan-7b": (7.0e9, None),
    "baichuan-13b": (13.26e9, None),
    "llama1-65b": (65.2e9, None),
    "gemma2-9b": (9.24e9, None),
    "internlm3-8b": (8.8e9, None),
    "qwen-7b": (7.72e9, None),
    "chatglm3-6b": (6.24e9, None),
    "baichuan2-7b": (7.51e9, None),
    "baichuan2-13b": (13.9e9, None),
    "phi3-small-7b": (7.39e9, None),  # "phi3-small" would read as a small preset (SMALL: names ending -small)
}


def recipe_for(preset: str, *extra: str):
    return load_recipe("generic", [*TINY_OVERRIDES, f"model.preset={preset}", *PRESET_OVERRIDES.get(preset, []), *extra])


@pytest.fixture(scope="module")
def shared_workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("presets") / "llm-runs"
    os.environ["LLM_HOME"] = str(ws)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield ws
    os.environ.pop("LLM_HOME", None)


def test_the_zoo_has_every_family():
    expected = {
        "llama-small", "llama2-small", "llama3-small", "qwen-small", "qwen2-small", "qwen3-small", "qwen3-moe-small",
        "baichuan2-small", "baichuan2-alibi-small", "chatglm-small", "mistral-small", "mixtral-small",
        "gemma-small", "phi-small", "deepseek-v2-small", "deepseek-v3-small",
        "yi-small", "internlm2-small", "qwen2.5-small", "qwen2-moe-small", "glm4-small", "phi3-mini-small",
        "baichuan-small", "baichuan-alibi-small", "llama1-small", "gemma2-small", "internlm3-small", "phi3-small-small",
    }
    assert expected <= set(SMALL)
    assert set(PUBLISHED) <= set(list_presets())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_presets_match_published_sizes(name):
    cfg = ModelConfig.from_dict(load_preset(name))  # counted only: never instantiated
    cfg.validate()
    total, active = PUBLISHED[name]
    assert cfg.num_params() == pytest.approx(total, rel=0.01)
    if active:
        assert cfg.active_params() == pytest.approx(active, rel=0.03)


def test_small_presets_are_small_and_use_their_knobs():
    for name in SMALL:
        cfg = ModelConfig.from_dict(load_preset(name))
        head = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
        assert 2.5e6 < cfg.num_params() - head < 8e6, name
    knobs = {name: ModelConfig.from_dict(load_preset(name)) for name in SMALL}
    assert knobs["baichuan2-alibi-small"].position == "alibi" and knobs["baichuan2-small"].position == "rope"
    assert knobs["baichuan2-small"].norm_head and knobs["baichuan2-small"].max_z_loss_coef == 2e-4
    assert knobs["qwen-small"].logn_train_len and knobs["qwen-small"].layer_windows()[0] is not None
    assert knobs["qwen-small"].layer_windows()[-1] is None  # smaller windows in the lower layers only
    assert knobs["mistral-small"].sliding_window and knobs["mixtral-small"].n_experts == 8
    assert knobs["phi-small"].parallel_block and knobs["phi-small"].rotary_pct == 0.4
    assert knobs["gemma-small"].mlp == "geglu" and knobs["gemma-small"].n_kv_heads == 1
    assert knobs["chatglm-small"].rope_2d and knobs["llama3-small"].rope_theta == 500_000
    assert knobs["llama2-small"].n_kv_heads < knobs["llama2-small"].n_heads
    for name in ("deepseek-v2-small", "deepseek-v3-small"):  # MLA + fine-grained and shared experts
        cfg = knobs[name]
        assert cfg.is_mla and cfg.n_shared_experts and cfg.moe_ffn_dim * 4 <= cfg.ffn_dim and cfg.n_dense_layers == 1
    assert knobs["deepseek-v3-small"].router_score == "sigmoid" and knobs["deepseek-v3-small"].q_lora_rank
    assert knobs["deepseek-v3-small"].router_bias_update == 0.001  # the V3 report's gamma
    assert knobs["qwen3-moe-small"].moe_balance == "global_batch"  # the Qwen3 report's choice
    assert knobs["yi-small"].n_kv_heads == 1 and knobs["yi-small"].rope_theta == 5e6 and not knobs["yi-small"].tie_embeddings
    assert knobs["internlm2-small"].n_kv_heads * 4 == knobs["internlm2-small"].n_heads
    qwen2_moe = knobs["qwen2-moe-small"]
    assert qwen2_moe.shared_expert_gate and qwen2_moe.n_shared_experts and not qwen2_moe.norm_topk_prob and qwen2_moe.qkv_bias
    assert knobs["glm4-small"].rotary_pct == 0.5 and knobs["glm4-small"].qkv_bias and not knobs["glm4-small"].rope_2d
    phi3 = knobs["phi3-mini-small"]
    assert phi3.norm == "rmsnorm" and phi3.mlp == "swiglu" and not phi3.parallel_block and phi3.n_kv_heads == phi3.n_heads
    for name, position in (("baichuan-small", "rope"), ("baichuan-alibi-small", "alibi")):  # Baichuan 1: no NormHead
        assert knobs[name].position == position and not knobs[name].norm_head and not knobs[name].max_z_loss_coef
    gemma2 = knobs["gemma2-small"]  # local and global layers alternating, soft caps, pre + post norms
    assert gemma2.layer_windows() == [64, None, 64, None] and gemma2.post_norms and gemma2.mlp == "geglu"
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (50.0, 30.0) and gemma2.query_pre_attn_scalar
    assert knobs["internlm3-small"].n_kv_heads * 4 == knobs["internlm3-small"].n_heads
    phi3s = knobs["phi3-small-small"]  # block-sparse attention visible at 64 tokens, dense every 2nd layer
    assert phi3s.blocksparse_block_size * phi3s.blocksparse_local_blocks < 64 and phi3s.blocksparse_vert_stride > 1
    assert [phi3s.is_block_sparse_layer(i) for i in range(4)] == [True, False, True, False]
    assert phi3s.mlp == "gegelu" and phi3s.gegelu_limit == 20.0 and phi3s.norm == "layernorm" and phi3s.tie_embeddings
    assert (phi3s.embedding_multiplier, phi3s.logit_divisor, phi3s.query_pre_attn_scalar) == (10.0, 8.0, 32**2)
    assert phi3s.qkv_bias and phi3s.o_bias and phi3s.mlp_bias and phi3s.n_kv_heads < phi3s.n_heads
    llama1 = knobs["llama1-small"]
    assert llama1.n_kv_heads == llama1.n_heads and not llama1.tie_embeddings


def test_the_generic_recipe_takes_the_presets_vocabulary():
    assert load_recipe("generic", ["model.preset=llama3-small"]).settings("tokenizer-train").vocab_size == 16384
    assert load_recipe("generic", ["model.preset=llama-small"]).model["vocab_size"] == 4096
    tiny = recipe_for("llama3-small")
    assert tiny.model["vocab_size"] == tiny.settings("tokenizer-train").vocab_size == 512


def _check_finished(results, stages):
    assert list(results)[-1] == stages[-1]
    for name in stages:
        assert results[name].metrics is not None


PRETRAINED: list[str] = []  # presets pretrained so far in this module's shared workspace


@pytest.mark.parametrize("name", SMALL)
def test_every_small_preset_pretrains_in_one_shared_workspace(shared_workspace, name):
    """Pretrain for each preset; the stages before it run once for all of them."""
    stages = STAGE_ORDER[: STAGE_ORDER.index("pretrain") + 1]
    recipe = recipe_for(name)
    planned = {p.name: p for p in plan(recipe, shared_workspace, stages)}
    assert all(planned[s].cached for s in stages[:-1]) == bool(PRETRAINED)  # data reused after the first
    results = run_pipeline(recipe, shared_workspace, SilentProgress(), stages=stages)
    _check_finished(results, stages)
    assert results["pretrain"].metrics["final_loss"] < 8.0  # ln(512) = 6.2 at the start
    PRETRAINED.append(name)


def test_a_glm_preset_runs_every_stage_and_exports_in_our_layout(shared_workspace):
    results = run_pipeline(recipe_for(FULL_IN_DEFAULT_RUN), shared_workspace, SilentProgress())
    assert list(results) == STAGE_ORDER
    assert "safetensors" in results["export"].outputs  # 2D positions: no transformers layout
    assert results["quantize"].metrics["compression"] > 2


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SMALL if n != FULL_IN_DEFAULT_RUN])
def test_every_small_preset_runs_every_stage(shared_workspace, name):
    results = run_pipeline(recipe_for(name), shared_workspace, SilentProgress())
    assert list(results) == STAGE_ORDER
    export = results["export"]
    assert ("hf" in export.outputs and export.metrics["max_logit_diff"] < 1e-4) or "safetensors" in export.outputs
