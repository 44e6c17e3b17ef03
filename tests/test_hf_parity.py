"""Logit parity with transformers for every family it supports, both ways.

For each family: a random tiny transformers model (float32, seeded) -> our import -> the
same logits; ours -> our export -> transformers loads it (no remote code) -> the same
logits; and greedy decoding gives the same tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from llm_lifecycle.models.checkpoint import SPECIAL_TOKENS, save_model_dir  # noqa: E402
from llm_lifecycle.models.decoder import Decoder, MoE  # noqa: E402
from llm_lifecycle.models.generate import generate  # noqa: E402
from llm_lifecycle.models.config import ModelConfig  # noqa: E402
from llm_lifecycle.models.hf import (  # noqa: E402
    ENDOFTEXT, check_exportable, config_from_hf, export_hf, hf_config, load_hf,
)
from llm_lifecycle.models.presets import load_preset  # noqa: E402

VOCAB = 128
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=None, eos_token_id=0,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
# model_type -> the tiny config's settings beyond TINY (what makes the family itself)
FAMILIES = {
    "llama": dict(attention_bias=True, tie_word_embeddings=True),
    "qwen2": dict(tie_word_embeddings=False),
    "qwen3": dict(head_dim=24, tie_word_embeddings=False),
    "qwen3_moe": dict(MOE, num_experts=4, norm_topk_prob=True, tie_word_embeddings=False),
    "mistral": dict(sliding_window=16, tie_word_embeddings=False),  # shorter than the prompts: windows matter
    "mixtral": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "gemma": dict(head_dim=24, hidden_act="gelu_pytorch_tanh"),
    "phi": dict(partial_rotary_factor=0.5, hidden_act="gelu_new", tie_word_embeddings=False),
    "glm": dict(head_dim=16, partial_rotary_factor=0.5, attention_bias=True),
    "qwen2_moe": dict(MOE, num_experts=4, shared_expert_intermediate_size=64, norm_topk_prob=False,
                      tie_word_embeddings=False),  # shared expert 2 x moe width behind a sigmoid gate
    "glm4": dict(head_dim=16, partial_rotary_factor=0.5, attention_bias=True),  # plus post-branch norms
    "phi3": dict(tie_word_embeddings=False, pad_token_id=0),  # q/k/v fused with GQA: unequal parts
    # local (window 16, shorter than the prompts) and global layers alternating; caps low enough
    # that tanh bends the scores and logits these random weights make
    "gemma2": dict(head_dim=24, query_pre_attn_scalar=20, sliding_window=16, attn_logit_softcapping=3.0,
                   final_logit_softcapping=4.0, hidden_activation="gelu_pytorch_tanh"),
    "internlm3": dict(head_dim=24, num_key_value_heads=1, tie_word_embeddings=False),
    "deepseek_v2": dict(  # queries without a latent here (V3 below has one)
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=2,
        first_k_dense_replace=1, routed_scaling_factor=1.5, topk_method="greedy", tie_word_embeddings=False,
    ),
    "deepseek_v3": dict(
        num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, moe_intermediate_size=16,
        n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        tie_word_embeddings=False,
    ),
}


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + [f"w{i}" for i in range(VOCAB - len(SPECIAL_TOKENS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def random_hf_model(model_type: str, **overrides):
    """A seeded tiny transformers model with every weight random, norms and biases included
    (their default init, ones and zeros, would hide a dropped bias or a mis-mapped norm)."""
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **FAMILIES[model_type], **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    return model


def prompts() -> torch.Tensor:
    return torch.randint(3, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(params=list(FAMILIES), scope="module")
def family(request, tmp_path_factory):
    """(theirs, ours imported from theirs' save_pretrained folder, the folder)."""
    root = tmp_path_factory.mktemp(request.param)
    theirs = random_hf_model(request.param)
    theirs.save_pretrained(root / "hf")
    tiny_tokenizer().save(str(root / "hf" / "tokenizer.json"))
    ours, tokenizer = load_hf(root / "hf")
    return theirs, ours, tokenizer, root


def test_import_matches_transformers_logits(family):
    theirs, ours, tokenizer, _ = family
    assert ours.cfg.family == theirs.config.model_type
    assert tokenizer.encode("w3 w5").ids == tiny_tokenizer().encode("w3 w5").ids
    x = prompts()
    with torch.no_grad():
        expected = theirs(x).logits
        assert expected.std() > 0.5  # the random weights make logits that vary, so agreement is meaningful
        assert max_diff(ours(x).logits, expected) < 1e-4


def test_export_loads_in_transformers_with_our_logits(family):
    theirs, ours, tokenizer, root = family
    save_model_dir(root / "ours", ours, tokenizer)
    export_hf(root / "ours", root / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(root / "exported"), dtype=torch.float32).eval()
    assert type(reloaded) is type(theirs)
    x = prompts()
    with torch.no_grad():
        assert max_diff(reloaded(x).logits, ours(x).logits) < 1e-4


def transformers_greedy(model, batch: list[list[int]], new_tokens: int = 8) -> list[list[int]]:
    """transformers' greedy continuation of each prompt."""
    continuations = []
    with torch.no_grad():
        for prompt in batch:
            out = model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
            )
            continuations.append(out[0, len(prompt):].tolist())
    return continuations


def test_greedy_generation_matches_transformers(family):
    theirs, ours, _, _ = family
    batch = [prompts()[0, :12].tolist(), prompts()[1, :5].tolist()]
    assert generate(ours, batch, max_new_tokens=8) == transformers_greedy(theirs, batch)


# DeepSeek-V2 as released (topk_method group_limited_greedy): here 8 experts in 4 groups of 2,
# each token keeping 2 groups, each group ranked by its best expert.
V2_GROUPS = dict(n_group=4, topk_group=2, topk_method="group_limited_greedy")


# The keys of deepseek-ai/DeepSeek-V2's config.json that say its shape, routing and positions.
RELEASED_V2 = dict(
    model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=102400, hidden_size=5120,
    intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128,
    num_key_value_heads=128, n_shared_experts=2, n_routed_experts=160, routed_scaling_factor=16.0, kv_lora_rank=512,
    q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="group_limited_greedy",
    n_group=8, topk_group=3, num_experts_per_tok=6, moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=False,
    scoring_func="softmax", aux_loss_alpha=0.003, seq_aux=True, hidden_act="silu", max_position_embeddings=163840,
    rms_norm_eps=1e-6, rope_theta=10000, attention_bias=False, tie_word_embeddings=False,
    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                  "original_max_position_embeddings": 4096, "type": "yarn"},
)


def chosen_experts(model: Decoder, x: torch.Tensor) -> list[torch.Tensor]:
    """Each MoE layer's chosen experts per token [N, k] (sorted) for the prompts `x`."""
    inputs = []
    moes = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoE)]
    hooks = [moe.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for moe in moes]
    with torch.no_grad():
        model(x)
        for hook in hooks:
            hook.remove()
        return [moe._route(moe.router(h.reshape(-1, h.size(-1))).float())[2].sort(dim=-1).values
                for moe, h in zip(moes, inputs)]


def test_deepseek_v2_group_limited_greedy_imports_and_exports_with_transformers_logits(tmp_path):
    theirs = random_hf_model("deepseek_v2", **V2_GROUPS)
    theirs.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save(str(tmp_path / "hf" / "tokenizer.json"))
    ours, tokenizer = load_hf(tmp_path / "hf")
    assert (ours.cfg.n_expert_groups, ours.cfg.topk_groups, ours.cfg.expert_group_score) == (4, 2, "max")
    # the same weights ranking groups by their best two experts (V3's rule) choose other experts
    v3_rule = Decoder(dataclasses.replace(ours.cfg, expert_group_score="top2_sum")).eval()
    v3_rule.load_state_dict(ours.state_dict())
    x = prompts()
    differ = [(a != b).any(dim=-1).float().mean().item() for a, b in zip(chosen_experts(ours, x), chosen_experts(v3_rule, x))]
    assert min(differ) > 0.05, differ
    save_model_dir(tmp_path / "ours", ours, tokenizer)
    export_hf(tmp_path / "ours", tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert {k: config[k] for k in V2_GROUPS} == V2_GROUPS
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs(x).logits
        assert max_diff(ours(x).logits, expected) < 1e-4
        assert max_diff(reloaded(x).logits, expected) < 1e-4
        assert max_diff(v3_rule(x).logits, expected) > 1e-2
    batch = [prompts()[0, :12].tolist(), prompts()[1, :5].tolist()]
    assert generate(ours, batch, max_new_tokens=8) == transformers_greedy(theirs, batch)


# DeepSeek's YaRN (the released V2 and V3 configs): cos/sin scaled by m(mscale) / m(mscale_all_dim)
# and every query-key score by m(mscale_all_dim)^2; unequal here so both parts show. 40-token
# prompts run past the original 16.
DEEPSEEK_YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "mscale": 1.0,
                 "mscale_all_dim": 0.707}


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_yarn_imports_and_exports_with_transformers_logits(tmp_path, model_type):
    theirs = random_hf_model(model_type, rope_scaling=DEEPSEEK_YARN)
    theirs.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save(str(tmp_path / "hf" / "tokenizer.json"))
    ours, tokenizer = load_hf(tmp_path / "hf")
    assert ours.cfg.rope_scaling == {"type": "yarn", "factor": 8.0, "original_max_seq_len": 16, "mscale": 1.0,
                                     "mscale_all_dim": 0.707}
    plain_yarn = {k: v for k, v in ours.cfg.rope_scaling.items() if "mscale" not in k}
    plain = Decoder(dataclasses.replace(ours.cfg, rope_scaling=plain_yarn)).eval()
    plain.load_state_dict(ours.state_dict())
    save_model_dir(tmp_path / "ours", ours, tokenizer)
    export_hf(tmp_path / "ours", tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), dtype=torch.float32).eval()
    x = prompts()
    with torch.no_grad():
        expected = theirs(x).logits
        assert max_diff(ours(x).logits, expected) < 1e-4
        assert max_diff(reloaded(x).logits, expected) < 1e-4
        assert max_diff(plain(x).logits, expected) > 1e-1  # the temperatures matter here
    batch = [prompts()[0, :20].tolist(), prompts()[1, :5].tolist()]  # decoding runs over the cached latents
    assert generate(ours, batch, max_new_tokens=8) == transformers_greedy(theirs, batch)


def test_deepseek_layouts_hold_only_their_own_group_rule():
    """V2's config.json holds groups ranked by their best expert, V3's by their best two: export
    refuses the other rule in one line; V2's plain greedy reads no groups."""
    v2 = config_from_hf({**TINY, **FAMILIES["deepseek_v2"], "model_type": "deepseek_v2", "n_group": 4, "topk_group": 2})
    assert (v2.n_expert_groups, v2.topk_groups) == (1, 1)  # topk_method greedy: transformers ignores the groups
    grouped = config_from_hf({**TINY, **FAMILIES["deepseek_v2"], **V2_GROUPS, "model_type": "deepseek_v2"})
    with pytest.raises(ValueError, match="topk_method group_limited_greedy ranks expert groups by "
                                         "expert_group_score='max', not 'top2_sum'"):
        check_exportable(dataclasses.replace(grouped, expert_group_score="top2_sum"))
    v3 = config_from_hf({**TINY, **FAMILIES["deepseek_v3"], "model_type": "deepseek_v3"})
    assert v3.expert_group_score == "top2_sum" and v3.n_expert_groups == 4
    with pytest.raises(ValueError, match="topk_method noaux_tc ranks expert groups by expert_group_score='top2_sum'"):
        check_exportable(dataclasses.replace(v3, expert_group_score="max"))
    # the released 236B's config.json (deepseek-ai/DeepSeek-V2): its routing and YaRN import as the full-size preset's
    released = config_from_hf(RELEASED_V2)
    preset = ModelConfig.from_dict(load_preset("deepseek-v2"))
    routing = ("n_experts", "n_experts_per_token", "n_shared_experts", "n_dense_layers", "n_expert_groups",
               "topk_groups", "expert_group_score", "routed_scale", "norm_topk_prob", "kv_lora_rank", "q_lora_rank",
               "head_dim")
    assert {f: getattr(released, f) for f in routing} == {f: getattr(preset, f) for f in routing}
    assert released.rope_scaling == {"type": "yarn", "factor": 40.0, "original_max_seq_len": 4096, "mscale": 0.707,
                                     "mscale_all_dim": 0.707}
    # the full-size preset is the released 236B's routing, and exports as it
    written = hf_config(preset, {ENDOFTEXT: 0})
    assert {k: written[k] for k in V2_GROUPS} == dict(n_group=8, topk_group=3, topk_method="group_limited_greedy")
    with pytest.raises(ValueError, match="topk_method='noaux_tc' are not supported \\(only 'group_limited_greedy' or 'greedy'\\)"):
        config_from_hf({**TINY, **FAMILIES["deepseek_v2"], "model_type": "deepseek_v2", "topk_method": "noaux_tc"})


def test_internlm3_imports_from_its_published_config_spelling(tmp_path):
    """internlm/internlm3-8b-instruct's config.json says qkv_bias and bias (transformers maps
    them to attention_bias and mlp_bias) and names its remote-code class."""
    theirs = random_hf_model("internlm3")
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(qkv_bias=config.pop("attention_bias"), bias=config.pop("mlp_bias"), architectures=["InternLM3ForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    tiny_tokenizer().save(str(tmp_path / "tokenizer.json"))
    ours, _ = load_hf(tmp_path)
    with torch.no_grad():
        assert max_diff(ours(prompts()).logits, theirs(prompts()).logits) < 1e-4
    config["qkv_bias"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="qkv_bias=True are not supported"):
        load_hf(tmp_path)


@pytest.mark.slow
def test_generate_bench_gives_transformers_greedy_tokens(tmp_path):
    """benches/generate_throughput.py --quick: ours eager and compiled and transformers'
    static+compile path must give its default generate's greedy tokens (the bench asserts)."""
    bench = Path(__file__).parents[1] / "benches" / "generate_throughput.py"
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(bench), "--quick", "--json", str(out)], check=True, capture_output=True)
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["greedy", "sampled"]
    assert all(r["ours compiled"] > 0 and r["HF default"] > 0 for r in rows)


# Phi-3's LongRoPE with an original context of 16: the 40-token prompts run past it (long
# factors), 12-token ones within it (short factors); both lists uneven so a swap would show.
LONGROPE = dict(
    original_max_position_embeddings=16,
    rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0],
                  "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 8.0, 12.0, 16.0]},
)


def test_phi3_longrope_imports_and_exports_with_transformers_logits_past_the_original_length(tmp_path):
    theirs = random_hf_model("phi3", **LONGROPE)
    theirs.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save(str(tmp_path / "hf" / "tokenizer.json"))
    ours, tokenizer = load_hf(tmp_path / "hf")
    scaling = ours.cfg.rope_scaling
    assert scaling["type"] == "longrope" and scaling["original_max_seq_len"] == 16
    assert scaling["factor"] == 8.0  # max_position_embeddings / original, as transformers reads it
    assert scaling["long_factor"] == LONGROPE["rope_scaling"]["long_factor"]
    save_model_dir(tmp_path / "ours", ours, tokenizer)
    export_hf(tmp_path / "ours", tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["original_max_position_embeddings"] == 16
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), dtype=torch.float32).eval()
    unscaled, _ = load_hf(tmp_path / "hf")
    unscaled.cfg.rope_scaling = None
    plain = type(ours)(unscaled.cfg).eval()
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for x in (prompts(), prompts()[:, :12]):  # past the original length, and within it
            expected = theirs(x).logits
            assert max_diff(ours(x).logits, expected) < 1e-4
            assert max_diff(reloaded(x).logits, expected) < 1e-4
        assert max_diff(plain(prompts()).logits, theirs(prompts()).logits) > 1e-2  # the scaling matters here
    prompt = prompts()[0, :20].tolist()  # past the original length from the first step
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 20, dtype=torch.long),
                              max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(ours, [prompt], max_new_tokens=8) == [out[0, 20:].tolist()]
