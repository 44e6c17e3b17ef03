"""Each architecture knob changes the computation the way its report describes."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder, RouterStats, alibi_slopes, apply_rope
from llm_lifecycle.models.generate import generate
from llm_lifecycle.models.upcycle import computes_the_dense_model, upcycle, upcycled_config
from llm_lifecycle.workflows.engine.memory import training_memory
from llm_lifecycle.workflows.engine.glm import GLMTokens, blank_infilling, glm_batches, packed_length
from llm_lifecycle.workflows.runner.planning import shape_of
from llm_lifecycle.workflows.engine.trainer import lm_loss

BASE = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
MOE = dict(BASE, n_experts=4, n_experts_per_token=2, moe_ffn_dim=24)


def make(seed: int = 0, **fields) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(ModelConfig(**{**BASE, **fields})).eval()


def tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def sharpen(model: Decoder, factor: float = 20.0) -> Decoder:
    """Scale q and k so attention patterns (and so positions) matter at init scale."""
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.wq.weight.mul_(factor)
            layer.attn.wk.weight.mul_(factor)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---- counting covers every knob --------------------------------------------------------------

KNOB_CONFIGS = {
    "layernorm-gelu-parallel": dict(norm="layernorm", mlp="gelu", parallel_block=True, rotary_pct=0.5),
    "geglu-alibi-normhead": dict(mlp="geglu", position="alibi", tie_embeddings=False, norm_head=True),
    "window-logn-bias": dict(sliding_window=8, window_layers=1, logn_train_len=16, qkv_bias=True),
    "moe-shared-dense-first": dict(MOE, n_layers=3, n_shared_experts=2, n_dense_layers=1, mlp="geglu"),
    "glm-2d": dict(rope_2d=True, rotary_pct=0.5, norm="layernorm"),
    "post-norms": dict(post_norms=True),
    # the interop knobs (their computation is checked against transformers in tests/test_hf_parity.py)
    "phi-biases-gemma-scale": dict(norm="layernorm", mlp="gelu", mlp_bias=True, o_bias=True, head_bias=True,
                                   tie_embeddings=False, scale_embeddings=True),
    "mla-deepseek-routing": dict(
        MOE, n_kv_heads=4, head_dim=None, kv_lora_rank=8, q_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=6, router_score="sigmoid", router_bias=True, n_expert_groups=2, topk_groups=1, routed_scale=2.0,
    ),
    "qwen2-moe-gated-shared": dict(MOE, n_shared_experts=2, shared_expert_gate=True, norm_topk_prob=False, qkv_bias=True),
    "phi3small-gegelu-blocksparse-mup": dict(
        norm="layernorm", mlp="gegelu", gegelu_limit=2.0, qkv_bias=True, o_bias=True, mlp_bias=True,
        blocksparse_block_size=4, blocksparse_local_blocks=2, blocksparse_vert_stride=3,
        dense_attention_every_n_layers=2, query_pre_attn_scalar=64.0, embedding_multiplier=10.0, logit_divisor=8.0,
    ),
}


@pytest.mark.parametrize("name", KNOB_CONFIGS)
def test_counts_match_the_module_for_every_knob(name):
    cfg = ModelConfig(**{**BASE, **KNOB_CONFIGS[name]})
    model = Decoder(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    if cfg.is_moe:
        unused = (cfg.n_layers - cfg.n_dense_layers) * (cfg.n_experts - cfg.n_experts_per_token)
        assert cfg.active_params() == cfg.num_params() - unused * 3 * cfg.dim * cfg.moe_ffn_dim
    mem = training_memory(shape_of(cfg), 2, 32)
    assert mem["total"] == mem["weights"] + mem["optimizer"] + max(mem["activations"] + mem["loss"], mem["grads"])
    out = model(tokens(2, 12))
    assert out.logits.shape == (2, 12, 97) and torch.isfinite(out.logits).all()


def test_defaults_keep_the_original_architecture():
    cfg = ModelConfig(**BASE)
    assert (cfg.norm, cfg.mlp, cfg.position, cfg.rotary_dim) == ("rmsnorm", "swiglu", "rope", cfg.head_dim)
    assert cfg.layer_windows() == [None, None] and not cfg.parallel_block and not cfg.norm_head


# ---- norms and MLPs --------------------------------------------------------------------------


def test_layernorm_centres_and_rmsnorm_does_not():
    x = torch.randn(3, 32) + 5.0
    ln = make(norm="layernorm").layers[0].attn_norm
    rms = make().layers[0].attn_norm
    assert isinstance(ln, torch.nn.LayerNorm) and ln.bias is not None
    torch.testing.assert_close(ln(x), F.layer_norm(x, (32,), eps=1e-5))
    assert ln(x).mean(-1).abs().max() < 1e-5  # LayerNorm subtracts the mean ...
    assert rms(x).mean(-1).min() > 0.5  # ... RMSNorm only rescales, the offset survives
    torch.testing.assert_close(rms(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


@pytest.mark.parametrize("kind", ["swiglu", "geglu", "gelu"])
def test_mlp_variants_compute_their_formula(kind):
    mlp = make(mlp=kind).layers[0].ffn
    x = torch.randn(5, 32)
    up = x @ mlp.w_up.weight.T
    if kind == "gelu":  # GPT-J / Phi: two matrices, GELU (tanh) in between
        assert mlp.w_gate is None
        expected = F.gelu(up, approximate="tanh") @ mlp.w_down.weight.T
    else:
        gate = x @ mlp.w_gate.weight.T
        act = F.silu(gate) if kind == "swiglu" else F.gelu(gate, approximate="tanh")
        expected = (act * up) @ mlp.w_down.weight.T
    torch.testing.assert_close(mlp(x), expected)


def test_ffn_sizing_eight_thirds_rounded_to_a_multiple():
    # LLaMA-7B: dim 4096 -> 8/3 * 4096 = 10922.67 -> multiple of 256 -> 11008
    assert ModelConfig(dim=4096, n_heads=32, n_kv_heads=32, ffn_dim=None).ffn_dim == 11008
    assert ModelConfig(dim=256, n_heads=8, ffn_dim=None, ffn_multiple_of=16).ffn_dim == 688
    assert ModelConfig(dim=256, n_heads=8, ffn_dim=None, mlp="gelu").ffn_dim == 1024  # plain MLP: 4 * dim
    gated, plain = ModelConfig(**{**BASE, "ffn_dim": None}), ModelConfig(**{**BASE, "ffn_dim": None, "mlp": "gelu"})
    assert gated.ffn_dim == 256 and plain.ffn_dim == 256  # both rounded up to one multiple at this size


def test_parallel_block_shares_one_norm():
    model = make(parallel_block=True, n_layers=1)
    block = model.layers[0]
    assert block.ffn_norm is None
    x = torch.randn(2, 6, 32)
    rope = model.rope(0, 6, x.device)
    h = block.attn_norm(x)
    expected = x + block.attn(h, rope, None, None) + block.ffn(h)
    out, _ = block(x, rope, None, None)
    torch.testing.assert_close(out, expected)
    sequential = make(n_layers=1)
    sequential.load_state_dict(model.state_dict(), strict=False)  # same weights, ffn_norm = 1
    assert max_diff(sequential(tokens(1, 6)).logits, model(tokens(1, 6)).logits) > 1e-4


def test_post_norms_normalise_each_branch_before_the_residual_add():
    model = make(post_norms=True, n_layers=1)
    block = model.layers[0]
    with torch.no_grad():
        block.attn_post_norm.weight.uniform_(0.5, 1.5)
        block.ffn_post_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 32)
    rope = model.rope(0, 6, x.device)
    h = x + block.attn_post_norm(block.attn(block.attn_norm(x), rope, None, None))
    expected = h + block.ffn_post_norm(block.ffn(block.ffn_norm(h)))
    out, _ = block(x, rope, None, None)
    torch.testing.assert_close(out, expected)


# ---- positions -------------------------------------------------------------------------------


def test_partial_rotary_rotates_only_the_first_fraction():
    cfg = ModelConfig(**{**BASE, "head_dim": 16, "rotary_pct": 0.25})
    model = Decoder(cfg)
    assert cfg.rotary_dim == 4 and model.rope.inv_freq.numel() == 2
    # GPT-NeoX / Phi: frequencies of a rotary embedding of width rotary_dim
    torch.testing.assert_close(model.rope.inv_freq, 1.0 / 10_000 ** (torch.arange(0, 4, 2).float() / 4))
    x = torch.randn(1, 7, 4, 16)  # [B, T, H, head_dim]
    rotated = apply_rope(x, model.rope(0, 7, x.device))
    assert torch.equal(rotated[..., 4:], x[..., 4:])  # the pass-through dims
    assert max_diff(rotated[..., :4], x[..., :4]) > 1e-2
    torch.testing.assert_close(rotated[:, 0], x[:, 0])  # position 0: no rotation
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps lengths


def test_alibi_slopes_follow_the_geometric_sequence():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads (not a power of two): the 8-head slopes, then every other 16-head slope
    sixteen = [2.0 ** (-(i + 1) / 2) for i in range(16)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor([2.0 ** -(i + 1) for i in range(8)] + sixteen[0::2][:4]))


def test_alibi_attention_adds_a_distance_penalty_and_no_rotation():
    model = make(position="alibi", n_layers=1, n_kv_heads=4)
    assert model.rope is None and model.cfg.rotary_dim == 0
    attn, seq = model.layers[0].attn, 6
    x = torch.randn(1, seq, 32)
    q = attn.wq(x).view(1, seq, 4, 8).transpose(1, 2)
    k = attn.wk(x).view(1, seq, 4, 8).transpose(1, 2)
    v = attn.wv(x).view(1, seq, 4, 8).transpose(1, 2)
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) - alibi_slopes(4)[:, None, None] * (i - j)
    scores = scores.masked_fill(j > i, float("-inf"))
    expected = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, seq, 32))
    mask = model._masks(0, seq, None, None, x.device)[None]
    torch.testing.assert_close(attn(x, [], mask, None), expected)


MLA = dict(n_kv_heads=4, head_dim=None, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
BLOCK_SPARSE = dict(blocksparse_block_size=2, blocksparse_local_blocks=2, blocksparse_vert_stride=3)
CACHE_CASES = [dict(position="alibi"), dict(sliding_window=4), dict(logn_train_len=6), MLA,
               dict(sliding_window=[4, None]), dict(position="alibi", sliding_window=4), dict(MLA, sliding_window=4),
               dict(BLOCK_SPARSE, dense_attention_every_n_layers=2), dict(BLOCK_SPARSE, position="alibi")]


def position_sensitive(fields) -> Decoder:
    return make(**fields) if fields.get("kv_lora_rank") else sharpen(make(**fields))


@pytest.mark.parametrize("fields", CACHE_CASES)
def test_kv_cache_decoding_matches_full_forward(fields):
    model = position_sensitive(fields)
    x = tokens(2, 14)
    full = model(x).logits
    cache = model.new_kv_cache()
    parts = [model(x[:, :5], kv_cache=cache).logits] + [model(x[:, i : i + 1], kv_cache=cache).logits for i in range(5, 14)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("fields", CACHE_CASES)
def test_static_cache_rows_at_their_own_positions_match_full_forward(fields):
    model = position_sensitive(fields)
    x = tokens(2, 14)
    full = model(x).logits
    cache = model.new_static_kv_cache(2, 16)
    starts = (5, 9)  # row 0 prefilled with 5 tokens, row 1 with 9, then both decode side by side
    for row, n in enumerate(starts):
        prefix = model.new_kv_cache()
        model(x[row : row + 1, :n], kv_cache=prefix)
        cache.fill(torch.tensor([row]), prefix)
    for step in range(5):
        ids = torch.stack([x[row, n + step] for row, n in enumerate(starts)])
        logits = model(ids[:, None], kv_cache=cache).logits[:, 0]
        expected = torch.stack([full[row, n + step] for row, n in enumerate(starts)])
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    assert cache.lengths.tolist() == [10, 14]


def test_rolling_buffer_cache_generates_the_full_caches_tokens_in_window_bounded_memory():
    """Mistral's rolling buffer: a windowed layer's generation cache holds `window` positions,
    position p at slot p % window, and greedy decoding matches a cache of every position."""
    from llm_lifecycle.workflows.engine.memory import inference_memory
    from llm_lifecycle.workflows.runner.planning import shape_of

    window = 6
    model = make(sliding_window=window)
    with torch.no_grad():  # wide weights: varied tokens with clear argmax margins
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
    prompts = [tokens(1, 11)[0].tolist(), tokens(1, 4, seed=2)[0].tolist()]  # longer and shorter than the window
    full = []  # every position kept: the growing KVCache
    with torch.no_grad():
        for prompt in prompts:
            cache, ids, out = model.new_kv_cache(), torch.tensor([prompt]), []
            for _ in range(30):
                ids = model(ids, kv_cache=cache).logits[:, -1].argmax(-1, keepdim=True)
                out.append(int(ids))
            assert cache.length == len(prompt) + 29
            full.append(out)
    assert generate(model, prompts, 30) == full
    assert len(set(full[0])) > 10  # the tokens vary, so agreement is not trivial
    per_layer = 2 * model.cfg.n_kv_heads * model.cfg.head_dim * 4  # fp32 keys and values per token
    for max_len in (5, 50, 5000):
        cache = model.new_static_kv_cache(2, max_len)
        assert cache.nbytes == 2 * model.cfg.n_layers * min(window, max_len) * per_layer
        assert inference_memory(shape_of(model.cfg), 2, max_len, "fp32")["kv_cache"] == cache.nbytes


def test_logn_scales_queries_only_past_the_training_length():
    plain = sharpen(make())
    logn = make(logn_train_len=8)
    logn.load_state_dict(plain.state_dict())
    x = tokens(2, 14)
    a, b = plain(x).logits, logn(x).logits
    torch.testing.assert_close(b[:, :8], a[:, :8], rtol=0, atol=1e-6)  # positions 0..7: scale 1
    assert (b[:, 8:] - a[:, 8:]).abs().amax(-1).min() > 1e-4
    # Qwen1: the query at 0-based position p is scaled by log_8(p + 1)
    from llm_lifecycle.models.decoder import logn_scale

    torch.testing.assert_close(logn_scale(torch.tensor([0, 7, 8, 63]), 8), torch.tensor([1.0, 1.0, math.log(9, 8), 2.0]))


# ---- sliding windows -------------------------------------------------------------------------


def test_sliding_window_hides_keys_older_than_the_window():
    model = sharpen(make(n_layers=1, sliding_window=4))
    x = tokens(1, 12)
    changed = x.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 97
    diff = (model(changed).logits - model(x).logits).abs().amax(-1)[0]
    assert diff[2:6].min() > 1e-4  # positions 2..5 have token 2 in their last 4 keys
    assert diff[6:].max() < 1e-6  # later ones do not see it
    full = make(n_layers=1)
    full.load_state_dict(model.state_dict())
    sharpen(full, 1.0)
    assert (full(changed).logits - full(x).logits).abs().amax(-1)[0, 6:].min() > 1e-4


def test_per_layer_windows():
    assert ModelConfig(**{**BASE, "n_layers": 4, "sliding_window": 8, "window_layers": 2}).layer_windows() == [8, 8, None, None]
    assert ModelConfig(**{**BASE, "sliding_window": [2, None]}).layer_windows() == [2, None]
    # two layers with window 2 reach back 2 tokens in all; with [2, None] the second layer sees everything
    narrow = sharpen(make(sliding_window=2))
    mixed = make(sliding_window=[2, None])
    mixed.load_state_dict(narrow.state_dict())
    x = tokens(1, 10)
    changed = x.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 97
    assert (narrow(changed).logits - narrow(x).logits).abs().amax(-1)[0, 3:].max() < 1e-6
    assert (mixed(changed).logits - mixed(x).logits).abs().amax(-1)[0, 3:].min() > 1e-4
    cfg = ModelConfig(**{**BASE, "sliding_window": [4, None]})
    assert cfg.flops_per_token(16) - ModelConfig(**BASE).flops_per_token(16) == -12 * 4 * 8 * 12
    with pytest.raises(ValueError, match="2 layers"):
        ModelConfig(**{**BASE, "sliding_window": [4]}).validate()


# ---- Phi-3-small: block-sparse attention, GeGeLU, muP ------------------------------------------

# Blocks of 2 tokens, 2 local blocks, stride 3, 4 heads (each head's stripes one block on):
# which key blocks (columns) each query block (rows) sees, written out by hand.
BLOCKS_SEEN = {
    0: ["1.....", "11....", ".11...", "..11..", "..111.", "..1.11"],  # stripes: blocks 2, 5
    1: ["1.....", "11....", ".11...", ".111..", ".1.11.", ".1..11"],  # blocks 1, 4
    2: ["1.....", "11....", "111...", "1.11..", "1..11.", "1..111"],  # blocks 0, 3
    3: ["1.....", "11....", ".11...", "..11..", "..111.", "..1.11"],  # (b + 1 + 3) % 3: blocks 2, 5 again
}


def expected_block_sparse(head: int, seq: int = 12, block: int = 2) -> torch.Tensor:
    seen = torch.tensor([[c == "1" for c in row] for row in BLOCKS_SEEN[head]])
    tokens_seen = seen.repeat_interleave(block, 0).repeat_interleave(block, 1)[:seq, :seq]
    return tokens_seen & torch.ones(seq, seq, dtype=torch.bool).tril()


def test_block_sparse_mask_is_the_hand_written_pattern_per_head_and_layer():
    model = make(n_layers=4, **BLOCK_SPARSE, dense_attention_every_n_layers=2)
    assert model.mask_keys == ["block_sparse", None, "block_sparse", None]  # layers 1, 3 dense: (i + 1) % 2 == 0
    masks = model._masks(0, 12, None, None, "cpu")
    assert masks[None] is None  # the dense layers keep the fused causal kernel
    sparse = masks["block_sparse"]
    assert sparse.shape == (4, 12, 12)
    for head in range(4):
        assert torch.equal(sparse[head], expected_block_sparse(head)), head
    assert sparse.any(0).equal(torch.ones(12, 12, dtype=torch.bool).tril())  # the heads together cover every key
    homo = make(**BLOCK_SPARSE, blocksparse_homo_heads=True)._masks(0, 12, None, None, "cpu")["block_sparse"]
    assert homo.shape == (1, 12, 12) and torch.equal(homo[0], expected_block_sparse(0))
    # decoding after a cache: the same rows of the pattern
    cache = model.new_kv_cache()
    model(tokens(1, 7), kv_cache=cache)
    step = model._masks(7, 1, cache, None, "cpu")["block_sparse"]
    assert torch.equal(step[:, 0], torch.stack([expected_block_sparse(h)[7:8, :8] for h in range(4)])[:, 0])
    every3 = ModelConfig(**{**BASE, **BLOCK_SPARSE, "n_layers": 6, "dense_attention_every_n_layers": 3})
    assert [every3.is_block_sparse_layer(i) for i in range(6)] == [True, True, False, True, True, False]
    assert all(ModelConfig(**{**BASE, **BLOCK_SPARSE}).is_block_sparse_layer(i) for i in range(2))  # 0: none dense


def test_block_sparse_attention_hides_the_blocks_outside_the_pattern():
    model = sharpen(make(n_layers=1, **BLOCK_SPARSE, blocksparse_homo_heads=True))  # stripes: blocks 2, 5
    x = tokens(1, 12)
    changed = x.clone()
    changed[0, 1] = (changed[0, 1] + 1) % 97  # block 0: local to query blocks 0 and 1 only
    diff = (model(changed).logits - model(x).logits).abs().amax(-1)[0]
    assert diff[1:4].min() > 1e-4 and diff[4:].max() < 1e-6
    changed = x.clone()
    changed[0, 4] = (changed[0, 4] + 1) % 97  # block 2, a stripe: every later query sees it
    assert (model(changed).logits - model(x).logits).abs().amax(-1)[0, 4:].min() > 1e-4
    # counted by what a query attends to: 2 local blocks (causal inside) plus the stripes before them
    cfg = model.cfg
    keys = sum(int(expected_block_sparse(0)[q].sum()) for q in range(12)) / 12
    dense = ModelConfig(**{**BASE, "n_layers": 1})
    assert cfg.flops_per_token(12) - dense.flops_per_token(12) == pytest.approx(12 * 4 * 8 * (keys - 12))
    hetero = ModelConfig(**{**BASE, **BLOCK_SPARSE, "n_layers": 1})
    keys = sum(int(expected_block_sparse(h).sum()) for h in range(4)) / 48
    assert hetero.flops_per_token(12) - dense.flops_per_token(12) == pytest.approx(12 * 4 * 8 * (keys - 12))


def test_block_sparse_left_padding_keeps_each_tokens_block():
    """A left-padded row (the eval harness's batched contexts) gets the blocks of its unpadded positions."""
    model = sharpen(make(**BLOCK_SPARSE))
    x = tokens(1, 9)
    alone = model(x).logits
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), x), dim=1)
    real = torch.cat((torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)), dim=1)
    cache = model.new_kv_cache(key_padding=real)
    out = model(padded, kv_cache=cache, position_ids=(real.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(out[:, 3:], alone, rtol=0, atol=1e-4)


def test_gegelu_is_quick_gelu_of_the_clamped_gate_times_the_clamped_linear_half_plus_one():
    mlp = make(mlp="gegelu", gegelu_limit=1.5, mlp_bias=True).layers[0].ffn
    x = torch.randn(64, 32) * 40  # wide enough that both clamps engage
    gate, up = mlp.w_gate(x), mlp.w_up(x)
    assert (gate > 1.5).any() and (up < -1.5).any()
    g = torch.minimum(gate, torch.tensor(1.5))
    expected = mlp.w_down(g * torch.sigmoid(1.702 * g) * (up.clamp(-1.5, 1.5) + 1))
    torch.testing.assert_close(mlp(x), expected)
    unclamped = make(mlp="gegelu").layers[0].ffn  # gegelu_limit null: no clamp
    gate, up = unclamped.w_gate(x), unclamped.w_up(x)
    torch.testing.assert_close(unclamped(x), unclamped.w_down(gate * torch.sigmoid(1.702 * gate) * (up + 1)))
    with pytest.raises(ValueError, match="needs mlp: gegelu"):
        ModelConfig(**{**BASE, "gegelu_limit": 20.0}).validate()


def test_mup_multiplies_the_embeddings_and_divides_the_logits():
    mup = make(tie_embeddings=False, embedding_multiplier=10.0, logit_divisor=8.0)
    plain = make(tie_embeddings=False)
    state = mup.state_dict()
    plain.load_state_dict({**state, "tok_embeddings.weight": state["tok_embeddings.weight"] * 10})
    x = tokens(2, 9)
    logits = mup(x).logits
    torch.testing.assert_close(logits, plain(x).logits / 8)
    targets = tokens(2, 9, seed=3)
    fused = mup(x, targets=targets)  # the fused loss scores the divided logits too
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, F.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1)))
    # Phi-3-small's attention scale mup_attn_multiplier / head_dim is query_pre_attn_scalar = head_dim^2
    scaled = make(query_pre_attn_scalar=8.0**2)
    ref = make()
    state = scaled.state_dict()
    ref.load_state_dict({k: v / 8**0.5 if k.endswith("attn.wq.weight") else v for k, v in state.items()})
    torch.testing.assert_close(scaled(x).logits, ref(x).logits)  # 1/8 = 8^-0.5 * 8^-0.5 (head_dim 8)


def test_phi3_small_preset_trains_and_generates_the_same_tokens_with_and_without_the_cache():
    from llm_lifecycle.models.presets import load_preset

    cfg = ModelConfig.from_dict({**load_preset("phi3-small-small"), "vocab_size": 97, "max_seq_len": 96})
    torch.manual_seed(0)
    model = Decoder(cfg)
    assert model.mask_keys == ["block_sparse", None, "block_sparse", None]
    data = tokens(4, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(data[:, :-1], targets=data[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    model.eval()
    prompts = [data[0, :20].tolist(), data[1, :37].tolist()]  # past several 16-token blocks
    with torch.no_grad():
        uncached = []
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(24):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            uncached.append(ids[len(prompt):])
    assert generate(model, prompts, 24) == uncached


# ---- NormHead and max-z loss (Baichuan2) -----------------------------------------------------


def test_norm_head_uses_unit_rows():
    model = make(tie_embeddings=False, norm_head=True)
    x = tokens(2, 6)
    before = model(x).logits
    with torch.no_grad():
        model.lm_head.weight.mul_(torch.rand(97, 1) * 10 + 0.1)  # rescale each row
    torch.testing.assert_close(model(x).logits, before)  # only the rows' directions matter
    plain = make(tie_embeddings=False)
    plain.load_state_dict(model.state_dict())
    assert max_diff(plain(x).logits, before) > 1e-3
    with pytest.raises(ValueError, match="tie_embeddings: false"):
        ModelConfig(**{**BASE, "norm_head": True}).validate()


def test_max_z_loss_is_added_through_aux_loss():
    model = make(max_z_loss_coef=2e-4)
    x = tokens(2, 9)
    out = model(x[:, :-1])
    expected = 2e-4 * out.logits.float().amax(-1).pow(2).mean()
    torch.testing.assert_close(out.aux_loss, expected)
    loss, metrics = lm_loss(model, (x[:, :-1], x[:, 1:]))
    assert loss.item() == pytest.approx(metrics["ce_loss"] + expected.item(), rel=1e-6)
    assert make()(x).aux_loss.item() == 0.0


# ---- mixture of experts ----------------------------------------------------------------------


def test_shared_experts_add_a_dense_path_every_token_takes():
    model = make(**{**MOE, "n_shared_experts": 2})
    moe = model.layers[0].ffn
    assert moe.shared.w_up.out_features == 2 * 24
    x = torch.randn(7, 32)
    out, _ = moe(x)
    shared = moe.shared
    moe.shared = None
    routed, _ = moe(x)
    torch.testing.assert_close(out, routed + shared(x))


def test_qwen2_moe_gates_the_shared_experts_per_token():
    """Qwen2-MoE: the shared experts' output times sigmoid(w . x), a gate per token."""
    model = make(**{**MOE, "n_shared_experts": 2, "shared_expert_gate": True})
    moe = model.layers[0].ffn
    x = torch.randn(7, 32)
    out, _ = moe(x)
    shared, gate = moe.shared, moe.shared_gate
    moe.shared = None
    routed, _ = moe(x)
    expected = routed + torch.sigmoid(x @ gate.weight.T) * shared(x)
    torch.testing.assert_close(out, expected)
    assert gate.weight.shape == (1, 32)


@pytest.mark.parametrize("rule, expert", [("max", 0), ("top2_sum", 2)])
def test_expert_groups_ranked_by_their_best_expert_or_their_best_two(rule, expert):
    """Group 0 holds the best expert alone, group 1 two good ones: DeepSeek-V2's rule keeps
    group 0 (its best expert), V3's keeps group 1 (the larger sum of its best two)."""
    moe = make(**{**MOE, "n_experts": 8, "n_experts_per_token": 1, "n_expert_groups": 4, "topk_groups": 1,
                  "norm_topk_prob": False, "expert_group_score": rule}).layers[0].ffn
    logits = torch.tensor([[3.0, -5.0, 2.5, 2.4, -5.0, -5.0, -5.0, -5.0]])
    probs, weights, experts = moe._route(logits)
    assert experts.tolist() == [[expert]]
    assert weights.item() == pytest.approx(probs[0, expert].item())  # the softmax probability, as chosen
    with pytest.raises(ValueError, match="expert_group_score 'min' is not one of top2_sum, max"):
        ModelConfig(**{**MOE, "expert_group_score": "min"}).validate()


def test_dense_first_layers():
    model = make(**{**MOE, "n_layers": 3, "n_dense_layers": 1})
    from llm_lifecycle.models.decoder import MLP, MoE

    assert [type(layer.ffn) for layer in model.layers] == [MLP, MoE, MoE]


def test_global_batch_balance_counts_the_whole_step():
    """Two micro-batches each routed to one expert are imbalanced alone, balanced together."""
    fields = {**MOE, "n_layers": 1, "n_experts": 2, "n_experts_per_token": 1}
    micro = make(**fields).train()
    glob = make(**{**fields, "moe_balance": "global_batch"}).train()
    first = RouterStats(torch.tensor([0.9, 0.1]), torch.tensor([8, 0]), torch.tensor(0.0))
    second = RouterStats(torch.tensor([0.1, 0.9]), torch.tensor([0, 8]), torch.tensor(0.0))
    coef = micro.cfg.router_aux_loss_coef
    # Switch balance n * sum f_i P_i: 2 * 0.9 for each micro-batch on its own
    assert micro._router_loss([first]).item() == pytest.approx(1.8 * coef)
    assert micro._router_loss([second]).item() == pytest.approx(1.8 * coef)
    glob.begin_global_batch()
    assert glob._router_loss([first]).item() == pytest.approx(1.8 * coef)  # only itself so far
    assert glob._router_loss([second]).item() == pytest.approx(1.0 * coef)  # f = (1/2, 1/2) over the step
    glob.begin_global_batch()
    assert glob._router_loss([second]).item() == pytest.approx(1.8 * coef)  # a new step counts afresh


@pytest.mark.parametrize("moe_ffn_dim", [64, 32])
def test_upcycled_experts_start_from_the_dense_mlp(moe_ffn_dim):
    dense = make(n_layers=2)
    moe_cfg = upcycled_config(dense.cfg, {"n_experts": 4, "n_experts_per_token": 2, "moe_ffn_dim": moe_ffn_dim})
    assert computes_the_dense_model(moe_cfg, noise=0.0) == (moe_ffn_dim == 64)
    moe = upcycle(dense, moe_cfg)
    assert moe.cfg.is_moe and moe.layers[0].ffn.router.weight.abs().max() < 0.01  # near-uniform router
    torch.testing.assert_close(moe.tok_embeddings.weight, dense.tok_embeddings.weight)
    x = tokens(2, 10)
    if moe_ffn_dim == 64:  # every expert a whole (permuted) copy: exactly the dense model
        torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=0, atol=1e-5)
        e0, e1 = moe.layers[0].ffn.w_up[0], moe.layers[0].ffn.w_up[1]
        assert not torch.equal(e0, e1)  # shuffled differently ...
        assert torch.equal(e0.sort(0).values, dense.layers[0].ffn.w_up.weight.sort(0).values)  # ... same neurons
    else:  # fine-grained: two experts together hold each copy of the dense neurons
        ffn = moe.layers[1].ffn
        neurons = torch.cat([ffn.w_up[0], ffn.w_up[1]])
        assert torch.equal(neurons.sort(0).values, dense.layers[1].ffn.w_up.weight.sort(0).values)
    with pytest.raises(ValueError, match="dense model"):
        upcycled_config(moe.cfg, {"n_experts": 4})
    with pytest.raises(ValueError, match="cannot exceed"):
        upcycled_config(dense.cfg, {"n_experts": 4, "moe_ffn_dim": 128})


# ---- GLM blank infilling ---------------------------------------------------------------------

GLM_IDS = GLMTokens(mask=90, sop=91, eop=92, pad=0)


def test_glm_example_masks_positions_and_targets():
    text = np.arange(3, 43)  # 40 distinct tokens
    length = packed_length(40, 0.15, 3.0)
    ids, targets, pos, mask = blank_infilling(text, np.random.default_rng(0), GLM_IDS, length)
    n_mask = int((ids == GLM_IDS.mask).sum())
    n_a = 40 - int((targets != -100).sum()) + 2 * n_mask  # part A = unmasked + one [MASK] per span
    n = n_a + (targets[n_a:] != -100).sum().item()
    assert n_mask >= 1 and (ids[n_a:n] == GLM_IDS.sop).sum() == n_mask
    # Part A: bidirectional among itself, never sees Part B
    assert mask[:n_a, :n_a].all() and not mask[:n_a, n_a:].any()
    # Part B: sees all of A, and B causally
    assert mask[n_a:n, :n_a].all()
    assert torch.equal(mask[n_a:n, n_a:n], torch.ones(n - n_a, n - n_a, dtype=torch.bool).tril())
    # padding sees only itself and nobody sees it
    assert torch.equal(mask[n:, n:], torch.eye(length - n, dtype=torch.bool)) and not mask[:n, n:].any()
    # targets: none in A; in B each span's tokens then [eop], and they are the cut-out text
    assert (targets[:n_a] == -100).all()
    assert (targets[n_a:n] == GLM_IDS.eop).sum() == n_mask
    cut = sorted(t for t in targets[n_a:n].tolist() if t != GLM_IDS.eop)
    kept = [t for t in ids[:n_a].tolist() if t != GLM_IDS.mask]
    assert sorted(cut + kept) == text.tolist()
    # 2D positions: A counts up with span position 0; a span's tokens share their [MASK]'s position
    assert torch.equal(pos[0, :n_a], torch.arange(n_a)) and (pos[1, :n_a] == 0).all()
    for i in range(n_a, n):
        if ids[i] == GLM_IDS.sop:
            assert ids[pos[0, i]] == GLM_IDS.mask and pos[1, i] == 1
        else:
            assert pos[0, i] == pos[0, i - 1] and pos[1, i] == pos[1, i - 1] + 1


def test_glm_batches_are_a_pure_function_of_the_step_and_train():
    windows = [(tokens(2, 32, seed=s), None) for s in range(3)]
    first = list(glm_batches(iter(windows), GLM_IDS, seed=5, start_step=0, mask_ratio=0.15, mean_span=3.0))
    resumed = list(glm_batches(iter(windows[2:]), GLM_IDS, seed=5, start_step=2, mask_ratio=0.15, mean_span=3.0))
    assert all(torch.equal(a, b) for a, b in zip(first[2], resumed[0]))
    model = make(rope_2d=True, vocab_size=97).train()
    ids, targets, pos, mask = first[0]
    assert pos.shape == (2, 2, ids.size(1)) and mask.shape == (2, ids.size(1), ids.size(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss, _ = lm_loss(model, first[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3


def test_glm_2d_positions_rotate_each_half_by_its_own_id():
    model = make(rope_2d=True)
    assert model.cfg.rotary_dim == 8 and model.rope.inv_freq.numel() == 2  # two halves of 4 dims
    x = torch.randn(1, 5, 4, 8)  # [B, T, H, head_dim]
    plain = apply_rope(x, model.rope(0, 5, x.device))  # 1D positions: span position 0
    assert torch.equal(plain[..., 4:], x[..., 4:])
    torch.testing.assert_close(apply_rope(x, model.rope(0, 5, x.device, torch.arange(5)[None])), plain)
    both = torch.stack([torch.arange(5), torch.arange(5)])[None]
    two_d = apply_rope(x, model.rope(0, 5, x.device, both))
    torch.testing.assert_close(two_d[..., :4], plain[..., :4])
    assert max_diff(two_d[..., 4:], x[..., 4:]) > 1e-2
    # in the decoder: the prefix-LM mask lets early tokens see later ones
    ids = tokens(1, 8)
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    changed = ids.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 97
    sharpen(model)
    diff = (model(changed, attn_mask=mask).logits - model(ids, attn_mask=mask).logits).abs().amax(-1)
    assert diff[0, 0] > 1e-4


def test_invalid_knob_values_say_what_to_do():
    for change, message in [
        (dict(norm="batchnorm"), "norm 'batchnorm' is not one of rmsnorm, layernorm"),
        (dict(mlp="relu"), "mlp 'relu'"),
        (dict(position="learned"), "position 'learned'"),
        (dict(rotary_pct=0.0), "rotary_pct"),
        (dict(rope_2d=True, position="alibi"), "rope_2d"),
        (dict(window_layers=1), "window_layers needs a sliding_window"),
        (dict(n_shared_experts=1), "needs n_experts > 0"),
        (dict(MOE, mlp="gelu"), "gated"),
        (dict(moe_balance="batch"), "moe_balance 'batch'"),
        (dict(MOE, shared_expert_gate=True), "shared_expert_gate .* needs n_shared_experts"),
        (dict(MOE, router_bias_update=0.001), "needs router_bias: true"),
        (dict(BLOCK_SPARSE, sliding_window=4), "block-sparse attention\\) cannot be combined with sliding_window"),
        (dict(blocksparse_block_size=0), "blocksparse_block_size must be a positive integer"),
        (dict(blocksparse_vert_stride=4), "blocksparse_vert_stride shape block-sparse attention; set blocksparse_block_size"),
        (dict(BLOCK_SPARSE, dense_attention_every_n_layers=-1), "dense_attention_every_n_layers must be an integer >= 0"),
        (dict(MOE, mlp="gegelu"), "gated"),
        (dict(logit_divisor=0.0), "logit_divisor must be positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            ModelConfig(**{**BASE, **change}).validate()
    assert dataclasses.replace(ModelConfig(**BASE), norm="layernorm").norm == "layernorm"
