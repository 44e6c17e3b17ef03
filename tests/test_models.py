"""The model zoo core: config, decoder, presets, checkpoints, generation."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from llm_lifecycle.models.checkpoint import SPECIAL_TOKENS, load_model_dir, save_model_dir
from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models import decoder
from llm_lifecycle.models.decoder import Decoder, KVCache, linear_cross_entropy, rope_frequencies
from llm_lifecycle.models.generate import generate
from llm_lifecycle.models.presets import list_presets, load_preset

DENSE = dict(family="llama", vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
MOE = dict(DENSE, family="qwen3_moe", qk_norm=True, tie_embeddings=False, n_experts=4, n_experts_per_token=2, moe_ffn_dim=24)


def make_model(seed: int = 0, **fields) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(ModelConfig(**fields)).eval()


def tokens(batch: int, seq: int, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + [f"w{i}" for i in range(94)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


# ---- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_heads=8, n_kv_heads=3), "divisible by n_kv_heads"),
        (dict(dim=30, n_heads=4), "dim \\(30\\) is not divisible by n_heads"),
        (dict(n_experts=4, n_experts_per_token=5), "n_experts_per_token \\(5\\)"),
        (dict(family="gpt2"), "family 'gpt2'"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "original_max_seq_len"),
        (dict(rope_scaling={"type": "su", "factor": 2.0}), "rope_scaling.type"),
        (dict(rope_scaling={"type": "longrope", "factor": 2.0, "original_max_seq_len": 16, "short_factor": [1.0],
                            "long_factor": [1.0]}), "short_factor must list 4 positive numbers"),
        (dict(head_dim=15, dim=60), "head_dim \\(15\\) must be even"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0, "beta": 1}), "unknown key\\(s\\) beta"),
        (dict(rope_scaling={"type": "llama3", "factor": 8.0}), "required for llama3"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0, "original_max_seq_len": 16, "mscale": 1.0,
                            "mscale_all_dim": 1.0}),
         "mscale and mscale_all_dim \\(DeepSeek's YaRN\\) go together and need MLA"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0, "mscale": 1.0}), "unknown key\\(s\\) mscale"),
        (dict(dca_chunk=0), "dca_chunk must be a positive integer"),
        (dict(dca_chunk=8, dca_local_window=9), "dca_local_window must be an integer between 0 and dca_chunk \\(8\\)"),
        (dict(dca_local_window=4), "dca_local_window needs dca_chunk"),
        (dict(dca_chunk=8, sliding_window=4), "cannot be combined with sliding_window"),
        (dict(dca_chunk=8, position="alibi"), "cannot be combined with position: alibi"),
    ],
)
def test_validate_rejects_impossible_shapes(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**DENSE, **change}).validate()


def test_from_dict_names_the_unknown_key_and_round_trips():
    with pytest.raises(ValueError, match="'n_head'.*valid settings:.*n_heads"):
        ModelConfig.from_dict({**DENSE, "n_head": 4})
    cfg = ModelConfig.from_dict(MOE)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.head_dim == 8  # None resolves to dim // n_heads


@pytest.mark.parametrize("fields", [DENSE, MOE, dict(DENSE, qkv_bias=True, qk_norm=True, tie_embeddings=False, head_dim=12)])
def test_param_counts_match_the_module(fields):
    cfg = ModelConfig(**fields)
    model = Decoder(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    unused_experts = cfg.n_experts - cfg.n_experts_per_token if cfg.is_moe else 0
    assert cfg.active_params() == cfg.num_params() - cfg.n_layers * unused_experts * 3 * cfg.dim * cfg.moe_ffn_dim


def test_flops_per_token_palm_formula():
    cfg = ModelConfig(**DENSE)  # tied: the head matmul counts, the embedding lookup does not
    slope = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim
    assert cfg.flops_per_token(100) - cfg.flops_per_token(50) == 50 * slope
    assert cfg.flops_per_token(0) == 6 * cfg.num_params()
    moe = ModelConfig(**MOE)
    assert moe.flops_per_token(0) == 6 * (moe.active_params() - moe.vocab_size * moe.dim)


def test_presets_load_validate_and_have_published_sizes():
    assert {"llama-small", "qwen3-moe-small", "llama3-8b", "qwen3-30b-a3b"} <= set(list_presets())
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*llama-small"):
        load_preset("nope")
    configs = {name: ModelConfig.from_dict(load_preset(name)) for name in list_presets()}
    for cfg in configs.values():
        cfg.validate()
    for name in ("llama-small", "qwen3-moe-small"):  # small enough to pretrain on a laptop CPU
        cfg = configs[name]
        head = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
        assert 2.5e6 < cfg.num_params() - head < 8e6, name
    assert round(configs["llama3-8b"].num_params() / 1e9, 2) == 8.03
    assert round(configs["qwen3-30b-a3b"].num_params() / 1e9, 1) == 30.5
    assert round(configs["qwen3-30b-a3b"].active_params() / 1e9, 1) == 3.4  # "A3B": 3.3B active + head


# ---- decoder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [DENSE, MOE])
def test_forward_shapes_and_causality(fields):
    model = make_model(**fields)
    x = tokens(2, 12)
    out = model(x)
    assert out.logits.shape == (2, 12, 97) and out.aux_loss.shape == ()
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 97
    out2 = model(changed)
    torch.testing.assert_close(out2.logits[:, :7], out.logits[:, :7], rtol=0, atol=1e-6)
    assert (out2.logits[:, 7:] - out.logits[:, 7:]).abs().amax(dim=-1).min() > 1e-4


def test_aux_loss_is_zero_dense_and_balance_for_moe():
    assert make_model(**DENSE)(tokens(2, 8)).aux_loss.item() == 0.0
    moe = make_model(**MOE)
    aux = moe(tokens(2, 8)).aux_loss
    # Per layer n_experts * sum f_i P_i >= ~1 (1 when perfectly balanced); times coef, summed over layers.
    assert aux.item() > 0.9 * moe.cfg.n_layers * moe.cfg.router_aux_loss_coef
    aux.backward()
    assert moe.layers[0].ffn.router.weight.grad.abs().sum() > 0


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make_model(**DENSE)
    mha = Decoder(ModelConfig(**{**DENSE, "n_kv_heads": DENSE["n_heads"]})).eval()
    group = DENSE["n_heads"] // DENSE["n_kv_heads"]
    head_dim = DENSE["dim"] // DENSE["n_heads"]
    state = gqa.state_dict()
    for name, value in list(state.items()):
        if name.endswith(("attn.wk.weight", "attn.wv.weight")):
            # query head h reads kv head h // group: repeat each kv head's rows `group` times
            state[name] = value.view(-1, head_dim, value.size(1)).repeat_interleave(group, dim=0).reshape(-1, value.size(1))
    mha.load_state_dict(state)
    x = tokens(2, 10)
    torch.testing.assert_close(mha(x).logits, gqa(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["grouped_mm", "padded_bmm"])
def test_moe_routing_matches_dense_all_experts_reference(dispatch, monkeypatch):
    """Both dispatch paths (torch._grouped_mm through our op, and one padded bmm) equal a
    plain per-token loop over its top-k, in the output and in every gradient."""
    if dispatch == "padded_bmm":
        monkeypatch.setattr(decoder, "_CPU_GROUPED_MM_DTYPES", frozenset())
    elif torch.float32 not in decoder._CPU_GROUPED_MM_DTYPES:
        pytest.skip("this torch build has no CPU torch._grouped_mm")
    model = make_model(**MOE)
    moe = model.layers[0].ffn
    x = torch.randn(3, 5, MOE["dim"], requires_grad=True)
    flat = x.reshape(-1, MOE["dim"])
    probs = torch.softmax(moe.router(flat).float(), dim=-1)
    top_p, top_e = probs.topk(moe.top_k, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)

    def expert(e, x):
        return F.linear(F.silu(F.linear(x, moe.w_gate[e])) * F.linear(x, moe.w_up[e]), moe.w_down[e])

    expected = torch.stack([
        sum(p * expert(int(e), flat[n : n + 1])[0] for p, e in zip(top_p[n], top_e[n]))
        for n in range(flat.size(0))
    ])
    out, _ = moe(x)
    torch.testing.assert_close(out.reshape(-1, MOE["dim"]), expected, rtol=0, atol=1e-6)
    upstream = torch.randn_like(expected)
    wrt = (x, moe.w_gate, moe.w_up, moe.w_down, moe.router.weight)
    for got, want in zip(torch.autograd.grad(out.reshape(-1, MOE["dim"]), wrt, upstream),
                         torch.autograd.grad(expected, wrt, upstream)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_moe_decoder_compiles_to_one_graph():
    """No graph break per MoE layer (a data-dependent expert count or capacity would cause one)."""
    if torch.float32 not in decoder._CPU_GROUPED_MM_DTYPES:
        pytest.skip("this torch build has no CPU torch._grouped_mm")
    model = make_model(**MOE).train()
    ids = tokens(2, 16)
    explained = torch._dynamo.explain(model)(ids, targets=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.parametrize("fields", [
    DENSE,  # tied head
    MOE,  # untied
    dict(DENSE, tie_embeddings=False, norm_head=True, head_bias=True),  # Baichuan2 NormHead, Phi's bias
])
def test_fused_head_loss_equals_cross_entropy_of_the_logits(fields):
    """Decoder(ids, targets=...) never builds the logits; its loss and every gradient equal
    cross_entropy over the logits of a plain forward, with ignored (-100) targets skipped."""
    model = make_model(**fields).train()
    ids, targets = tokens(3, 12), tokens(3, 12, seed=2)
    targets[0, :5] = -100
    fused = model(ids, targets=targets)
    assert fused.logits is None
    plain = F.cross_entropy(model(ids).logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(fused.loss, plain, rtol=0, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    for got, want in zip(torch.autograd.grad(fused.loss, params), torch.autograd.grad(plain, params)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_linear_cross_entropy_across_chunks_with_bias_and_frozen_weight():
    """Enough rows for several chunks; a frozen weight gets no gradient, the rest match."""
    torch.manual_seed(0)
    vocab = 20_000  # 128-row chunks
    hidden = torch.randn(300, 16, requires_grad=True)
    weight, bias = torch.randn(vocab, 16) * 0.1, torch.randn(vocab, requires_grad=True)
    targets = torch.randint(0, vocab, (300,))
    targets[::3] = -100
    loss = linear_cross_entropy(hidden, weight, bias, targets)
    want = F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=-100)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    for got, expected in zip(torch.autograd.grad(2 * loss, (hidden, bias)), torch.autograd.grad(2 * want, (hidden, bias))):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, bias, targets), want.detach())


@pytest.mark.parametrize("fields", [DENSE, MOE])
def test_a_few_adamw_steps_reduce_the_loss(fields):
    model = make_model(**fields).train()
    batch = tokens(4, 17)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(batch[:, :-1])
        loss = F.cross_entropy(out.logits.reshape(-1, 97), batch[:, 1:].reshape(-1)) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_init_scales_residual_projections():
    model = make_model(**{**DENSE, "n_layers": 8, "dim": 128, "n_heads": 4, "ffn_dim": 256})
    std = model.layers[0].attn.wo.weight.std().item()
    assert abs(std - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
    assert abs(model.layers[0].attn.wq.weight.std().item() - 0.02) < 0.002


def test_kv_cache_prefill_chunks_and_decode_match_full_forward():
    model = make_model(**MOE)
    x = tokens(2, 20)
    full = model(x).logits
    cache = model.new_kv_cache()
    parts = [model(x[:, :9], kv_cache=cache).logits, model(x[:, 9:15], kv_cache=cache).logits]
    parts += [model(x[:, i : i + 1], kv_cache=cache).logits for i in range(15, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
    assert cache.length == 20


def test_left_padded_cache_equals_unpadded_rows():
    model = make_model(**DENSE)
    short, long = tokens(1, 5, seed=2)[0], tokens(1, 9, seed=3)[0]
    padded = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), short]), long])
    real = torch.ones(2, 9, dtype=torch.bool)
    real[0, :4] = False
    cache = KVCache(model.cfg.n_layers, key_padding=real)
    logits = model(padded, kv_cache=cache).logits
    torch.testing.assert_close(logits[0, 4:], model(short[None]).logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1], model(long[None]).logits[0], rtol=0, atol=1e-5)


# ---- RoPE scaling ----------------------------------------------------------------------------


def test_rope_scaling_frequencies():
    base = ModelConfig(**DENSE)
    plain, _ = rope_frequencies(base)
    linear, _ = rope_frequencies(dataclasses.replace(base, rope_scaling={"type": "linear", "factor": 4.0}))
    torch.testing.assert_close(linear, plain / 4)
    ntk, _ = rope_frequencies(dataclasses.replace(base, rope_scaling={"type": "ntk", "factor": 4.0}))
    # NTK-aware: the highest frequency is kept, the lowest is interpolated by exactly `factor`.
    assert ntk[0] == plain[0] and torch.isclose(ntk[-1], plain[-1] / 4)
    yarn, temperature = rope_frequencies(
        dataclasses.replace(base, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 64})
    )
    assert yarn[0] == plain[0] and torch.isclose(yarn[-1], plain[-1] / 4)
    assert temperature == pytest.approx(1 + 0.1 * torch.log(torch.tensor(4.0)).item())


def test_longrope_matches_transformers_within_and_past_the_original_length():
    """Phi-3's LongRoPE: short factors up to the original length, long ones past it, cos/sin
    scaled by sqrt(1 + ln(factor) / ln(original)) — transformers' numbers for the same config."""
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llm_lifecycle.models.decoder import RotaryEmbedding

    short, long = [1.0, 1.1, 1.3, 2.0], [1.0, 1.5, 4.0, 16.0]
    scaling = {"type": "longrope", "factor": 8.0, "original_max_seq_len": 16, "short_factor": short, "long_factor": long}
    cfg = ModelConfig(**{**DENSE, "head_dim": 8, "n_heads": 4, "dim": 32, "rope_scaling": scaling, "max_seq_len": 128})
    cfg.validate()
    hf = Phi3Config(hidden_size=32, num_attention_heads=4, max_position_embeddings=128, original_max_position_embeddings=16,
                    rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long})
    rope = RotaryEmbedding(cfg)
    for length in (16, 17):
        hf_freq, hf_scale = ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu", seq_len=length)
        cos, _ = rope(0, length, torch.device("cpu"))[0]
        assert rope.scale == pytest.approx(hf_scale)
        torch.testing.assert_close(rope.inv_freq, hf_freq)
        expected = torch.cat((hf_freq, hf_freq))[None, :] * torch.arange(length).float()[:, None]
        torch.testing.assert_close(cos[:, 0], expected.cos() * hf_scale)


def test_derived_longrope_factors_give_yarns_frequencies():
    """extend-context's LongRoPE without given factors: YaRN's frequencies past the original
    length, the unscaled ones within it, and LongRoPE's own cos/sin scale."""
    from llm_lifecycle.models.decoder import RotaryEmbedding, yarn_as_longrope

    cfg = ModelConfig(**{**DENSE, "head_dim": 16, "max_seq_len": 256})
    lists = yarn_as_longrope(cfg, 8.0, 32)
    longrope = RotaryEmbedding(dataclasses.replace(cfg, rope_scaling={
        "type": "longrope", "factor": 8.0, "original_max_seq_len": 32, **lists}))
    yarn = RotaryEmbedding(dataclasses.replace(cfg, rope_scaling={"type": "yarn", "factor": 8.0, "original_max_seq_len": 32}))
    longrope(0, 33, torch.device("cpu"))
    torch.testing.assert_close(longrope.inv_freq, yarn.inv_freq)
    assert lists["long_factor"][0] == pytest.approx(1.0) and lists["long_factor"][-1] == pytest.approx(8.0)
    assert longrope.scale == pytest.approx((1 + math.log(8) / math.log(32)) ** 0.5)
    longrope(0, 32, torch.device("cpu"))
    torch.testing.assert_close(longrope.inv_freq, RotaryEmbedding(cfg).inv_freq)


# Dual Chunk Attention: chunks of 6, a local window of 2 (a model "trained" to 8 positions)
DCA = dict(DENSE, dca_chunk=6, dca_local_window=2)


def sharp_model(**fields) -> Decoder:
    """Random weights with q and k scaled up, so attention depends on positions at init."""
    model = make_model(**fields)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.wq.weight.mul_(20)
            layer.attn.wk.weight.mul_(20)
    return model


def with_config(model: Decoder, **change) -> Decoder:
    other = Decoder(dataclasses.replace(model.cfg, **change)).eval()
    other.load_state_dict(model.state_dict())
    return other


def test_dual_chunk_attention_is_plain_attention_up_to_chunk_plus_window():
    dca = sharp_model(**DCA)
    plain = with_config(dca, dca_chunk=None, dca_local_window=0)
    x = tokens(2, 20)
    with torch.no_grad():
        for length in (5, 8):  # within one chunk; chunk + window: every distance still the true one
            torch.testing.assert_close(dca(x[:, :length]).logits, plain(x[:, :length]).logits, rtol=0, atol=1e-5)
        assert (dca(x).logits[:, 9:] - plain(x).logits[:, 9:]).abs().amax(dim=-1).min() > 1e-4  # past it: re-positioned


def test_dual_chunk_attention_scores_follow_the_papers_position_matrix():
    """One layer's attention against the DCA paper's relative-position matrix M computed
    pair by pair: same chunk (i mod s) - (j mod s); previous chunk (s + i mod s, or c - 1
    once i is past the local window) - (j mod s); earlier chunks c - 1 - (j mod s)."""
    s, w, c, seq = 6, 2, 8, 20
    model = sharp_model(**DCA)
    attn, cfg = model.layers[0].attn, model.cfg
    x = torch.randn(1, seq, cfg.dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = attn(x, model._dual_chunk_rope(0, seq, None, None, x.device), None, None)
        q = attn.wq(x).view(seq, cfg.n_heads, cfg.head_dim)
        k = attn.wk(x).view(seq, cfg.n_kv_heads, cfg.head_dim).repeat_interleave(2, dim=1)
        v = attn.wv(x).view(seq, cfg.n_kv_heads, cfg.head_dim).repeat_interleave(2, dim=1)
        cos, sin = model.rope(0, c, x.device)[0]
        expected = torch.zeros(seq, cfg.n_heads, cfg.head_dim)
        for i in range(seq):
            scores = torch.full((cfg.n_heads, seq), float("-inf"))
            for j in range(i + 1):
                gap = i // s - j // s
                query_pos = i % s if gap == 0 else (s + i % s if gap == 1 and i % s < w else c - 1)
                distance = query_pos - j % s
                assert 0 <= distance < c
                rotated = decoder.apply_rope(q[i][None, None], [(cos[distance : distance + 1], sin[distance : distance + 1])])
                scores[:, j] = (rotated[0, 0] * k[j]).sum(-1) * cfg.head_dim**-0.5
            expected[i] = torch.einsum("hs,shd->hd", torch.softmax(scores, dim=-1), v)
        torch.testing.assert_close(out, attn.wo(expected.reshape(1, seq, -1)), rtol=1e-4, atol=1e-5)


def test_dual_chunk_attention_decodes_with_a_cache_as_it_scores_in_one_pass():
    model = sharp_model(**DCA)
    x = tokens(2, 20)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_kv_cache()
        steps = [model(x[:, :7], kv_cache=cache).logits] + [model(x[:, t : t + 1], kv_cache=cache).logits for t in range(7, 20)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
        prompt = x[0, :10].tolist()
        expected = list(prompt)
        for _ in range(8):  # greedy by full forwards, no cache
            expected.append(int(model(torch.tensor([expected])).logits[0, -1].argmax()))
    assert generate(model, [prompt], max_new_tokens=8) == [expected[10:]]
    short = x[1, :3].tolist()  # rows at their own positions in one static cache, across chunk borders
    alone = generate(model, [short], max_new_tokens=8)[0]
    assert generate(model, [prompt, short], max_new_tokens=8) == [expected[10:], alone]


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn"])
def test_rope_scaling_keeps_weights_and_changes_only_later_positions(kind):
    model = make_model(**DENSE)
    with torch.no_grad():  # sharpen attention so positions matter at init scale
        for layer in model.layers:
            layer.attn.wq.weight.mul_(20)
            layer.attn.wk.weight.mul_(20)
    scaled_cfg = dataclasses.replace(model.cfg, rope_scaling={"type": kind, "factor": 2.0, "original_max_seq_len": 32})
    scaled = Decoder(scaled_cfg).eval()
    scaled.load_state_dict(model.state_dict())  # no rotary tables in checkpoints
    x = tokens(2, 12)
    a, b = model(x).logits, scaled(x).logits
    torch.testing.assert_close(b[:, 0], a[:, 0], rtol=0, atol=1e-5)  # one token: attention is trivial
    assert (b[:, 1:] - a[:, 1:]).abs().amax(dim=-1).min() > 1e-4  # every later position moves


# ---- checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [DENSE, MOE])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, fields):
    model = make_model(**fields)
    tok = tiny_tokenizer()
    target = save_model_dir(tmp_path / "model", model, tok, extra={"stage": "pretrain"})
    config = json.loads((target / "config.json").read_text())
    assert config["format"] == "llm-lifecycle" and config["stage"] == "pretrain"
    assert config["model"] == model.cfg.to_dict()
    with safe_open(str(target / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) != ("tok_embeddings.weight" in keys) or not model.cfg.tie_embeddings
    loaded, loaded_tok = load_model_dir(target)
    x = tokens(2, 10)
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert [loaded_tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    if model.cfg.tie_embeddings:
        assert loaded.lm_head.weight is loaded.tok_embeddings.weight


def test_checkpoint_save_replaces_existing_dir_atomically(tmp_path):
    target = tmp_path / "model"
    save_model_dir(target, make_model(seed=0, **DENSE), tiny_tokenizer())
    (target / "stale.txt").write_text("from the old save")
    second = make_model(seed=1, **DENSE)
    save_model_dir(target, second, tiny_tokenizer())
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dirs left behind
    loaded, _ = load_model_dir(target)
    assert torch.equal(loaded.lm_head.weight, second.lm_head.weight)


def test_failed_save_leaves_the_old_checkpoint(tmp_path):
    target = tmp_path / "model"
    save_model_dir(target, make_model(**DENSE), tiny_tokenizer())
    before = (target / "model.safetensors").read_bytes()

    class Broken:
        def save(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model_dir(target, make_model(seed=1, **DENSE), Broken())
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---- generation ------------------------------------------------------------------------------


def greedy_by_recomputing(model: Decoder, prompt: list[int], n: int, stop: set[int]) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(n):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if token in stop:
            break
        ids.append(token)
        out.append(token)
    return out


@pytest.mark.parametrize("fields", [DENSE, MOE])
def test_greedy_generation_with_cache_equals_full_recompute(fields):
    model = make_model(**fields)
    prompts = [tokens(1, 3, seed=4)[0].tolist(), tokens(1, 8, seed=5)[0].tolist(), tokens(1, 1, seed=6)[0].tolist()]
    got = generate(model, prompts, max_new_tokens=12)
    assert got == [greedy_by_recomputing(model, p, 12, set()) for p in prompts]
    assert all(len(g) == 12 for g in got)


def test_generation_stops_per_row_at_a_stop_id():
    model = make_model(**DENSE)
    prompts = [tokens(1, 4, seed=7)[0].tolist(), tokens(1, 6, seed=8)[0].tolist()]
    free = generate(model, prompts, max_new_tokens=10)
    stop = free[0][3]  # make row 0 stop at its 4th token
    got = generate(model, prompts, max_new_tokens=10, stop_ids=[stop])
    assert got[0] == free[0][: free[0].index(stop)]
    assert got[1] == greedy_by_recomputing(model, prompts[1], 10, {stop})


def test_finished_rows_leave_the_batch_and_the_others_go_on():
    model = make_model(**DENSE)
    prompts = [tokens(1, n, seed=20 + n)[0].tolist() for n in (2, 5, 3, 7)]
    free = generate(model, prompts, max_new_tokens=10)
    # rows 0, 1 and 2 stop early (3 of 4: the batch shrinks to the last row), row 3 never does
    stops = {free[0][1], free[1][2], free[2][0]} - set(free[3])
    got = generate(model, prompts, max_new_tokens=10, stop_ids=stops)
    assert got == [greedy_by_recomputing(model, p, 10, stops) for p in prompts]
    assert len(got[3]) == 10 and all(len(g) < 10 for g in got[:3])


def test_steer_forces_a_token_the_model_then_reads():
    model = make_model(**DENSE)
    prompts = [tokens(1, 4, seed=30)[0].tolist(), tokens(1, 6, seed=31)[0].tolist()]
    forced = 42

    def force_row_1_at_step_2(step, rows, picked):
        if step == 2 and 1 in rows:
            picked = picked.clone()
            picked[rows.index(1)] = forced
        return picked

    got = generate(model, prompts, max_new_tokens=8, steer=force_row_1_at_step_2)
    free = generate(model, prompts, max_new_tokens=8)
    assert got[0] == free[0]
    assert got[1][:2] == free[1][:2] and got[1][2] == forced
    assert got[1][3:] == greedy_by_recomputing(model, prompts[1] + got[1][:3], 5, set())


def thinking_tokens(out: list[int], open_id: int, close_id: int) -> tuple[int, bool]:
    """(tokens after the first <think>, up to </think> or the end; whether </think> came)."""
    body = out[out.index(open_id) + 1 :]
    return (body.index(close_id), True) if close_id in body else (len(body), False)


@pytest.mark.parametrize("budget", [1, 3, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_thinking_budget_is_never_exceeded(budget, seed):
    """Rows open <think> at different steps (forced), then sample freely; with the budget's
    steer no row thinks more than `budget` tokens, and a row that reached it is closed at once.
    Some rows stop early (a stop id), so the batch shrinks while the budget runs."""
    from llm_lifecycle.models.generate import ThinkingBudget

    open_id, close_id, stop_id = 3, 4, 5
    model = make_model(**DENSE)
    prompts = [tokens(1, n, seed=50 + n)[0].tolist() for n in (2, 3, 4, 5, 6, 7)]

    def open_then_budget(make_budget):
        limit = make_budget()

        def steer(step, rows, picked):
            picked = picked.clone()
            for i, row in enumerate(rows):
                if step == row % 3:  # rows open their block at steps 0, 1 or 2
                    picked[i] = open_id
            return limit(step, rows, picked) if limit else picked
        return steer

    capped = generate(model, prompts, 30, temperature=1.5, seed=seed, stop_ids=[stop_id],
                      steer=open_then_budget(lambda: ThinkingBudget(budget, open_id, close_id)))
    free = generate(model, prompts, 30, temperature=1.5, seed=seed, stop_ids=[stop_id],
                    steer=open_then_budget(lambda: None))
    assert any(thinking_tokens(out, open_id, close_id)[0] > budget for out in free)  # the budget has work to do
    forced = 0
    for out in capped:
        n, closed = thinking_tokens(out, open_id, close_id)
        assert n <= budget, (budget, out)
        after = out[out.index(open_id) + 1 :]
        if len(after) > budget:  # went on past the budget: then the block was closed exactly there or before
            assert closed
        forced += closed and n == budget
    assert forced >= 1


def test_the_thinking_budget_needs_think_tokens_and_a_sane_value():
    from tokenizers import Tokenizer, models

    from llm_lifecycle.models.generate import ThinkingBudget, thinking_budget

    plain = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="<|endoftext|>"))
    with pytest.raises(ValueError, match="needs a tokenizer with <think> and </think> tokens, and this one has none"):
        thinking_budget(plain, 4)
    assert thinking_budget(plain, 0) is None  # no limit needs no markup
    with pytest.raises(ValueError, match=">= 0"):
        thinking_budget(plain, -1)
    marked = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "<think>": 1, "</think>": 2}, unk_token="<|endoftext|>"))
    steer = thinking_budget(marked, 4)
    assert isinstance(steer, ThinkingBudget) and (steer.open_id, steer.close_id, steer.budget) == (1, 2, 4)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_tokens():
    model = make_model(**MOE)
    prompts = [tokens(1, n, seed=40 + n)[0].tolist() for n in (3, 9, 5)]
    assert generate(model, prompts, 12, compile=True) == generate(model, prompts, 12)


def test_sampling_draws_each_token_at_its_probability_and_never_a_dropped_one():
    from llm_lifecycle.models.generate import _pick

    logits = torch.tensor([2.0, 0.0, 1.0, -1.0, 0.5]).log_softmax(-1)
    want = logits.softmax(-1)
    picks = _pick(logits.repeat(40_000, 1), 1.0, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=5).float() / picks.numel()
    assert (freq - want).abs().max() < 0.01  # 4 standard errors at 40,000 draws
    # top_p 0.8: tokens 0 and 2 hold 0.77 < 0.8, so token 4 joins them; 1 and 3 are never drawn
    kept = _pick(logits.repeat(40_000, 1), 1.0, 0.8, torch.Generator().manual_seed(1))
    assert set(kept.tolist()) == {0, 2, 4}
    nucleus = want[[0, 2, 4]] / want[[0, 2, 4]].sum()
    freq = torch.bincount(kept, minlength=5).float()[[0, 2, 4]] / kept.numel()
    assert (freq - nucleus).abs().max() < 0.01


@pytest.mark.parametrize("spread", [6.0, 0.1])  # a nucleus among the leading tokens; one past them
def test_top_p_draws_only_from_the_nucleus_of_a_large_vocabulary(spread):
    from llm_lifecycle.models.generate import _pick

    logits = torch.randn(8, 4096, generator=torch.Generator().manual_seed(0)) * spread
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    size = ((sorted_probs.cumsum(-1) - sorted_probs) < 0.9).sum(-1)  # tokens in each row's nucleus
    assert (size < 256).all() if spread > 1 else (size > 256).all()
    picks = _pick(logits.repeat(500, 1), 1.0, 0.9, torch.Generator().manual_seed(2)).view(500, 8)
    for row in range(8):
        drawn = set(picks[:, row].tolist())
        assert drawn <= set(order[row, : size[row]].tolist())
        if spread < 1:  # the draws reach past the 256 leading tokens the nucleus outgrows
            assert drawn - set(order[row, :256].tolist())


def test_sampling_is_seeded_and_top_p_narrows_to_the_argmax():
    model = make_model(**DENSE)
    prompts = [[5, 6, 7], [8]]
    a = generate(model, prompts, 8, temperature=1.0, seed=3)
    assert a == generate(model, prompts, 8, temperature=1.0, seed=3)
    assert a != generate(model, prompts, 8, temperature=1.0, seed=4)
    # a nucleus so small it holds only the most likely token is greedy decoding
    assert generate(model, prompts, 8, temperature=1.0, top_p=1e-6, seed=0) == generate(model, prompts, 8)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 4)
