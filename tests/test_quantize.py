"""Weight-only quantization (RTN, GPTQ, AWQ at 8 and 4 bits): the grid, the algorithms'
defining properties on one layer, dense and MoE decoders, and quantized model directories."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import nn

from llm_lifecycle.models.checkpoint import SPECIAL_TOKENS
from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder
from llm_lifecycle.models.load import load_model
from llm_lifecycle.models.quantize import (
    QuantConfig,
    QuantizedExperts,
    QuantizedLinear,
    awq,
    from_codes,
    gptq,
    grid_params,
    load_quantized,
    pack_codes,
    quantize_model,
    rtn,
    save_quantized,
    state_dict_bytes,
    to_codes,
    unpack_codes,
)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


MOE = dict(family="qwen3_moe", qk_norm=True, n_experts=4, n_experts_per_token=2, moe_ffn_dim=48, tie_embeddings=False)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def dequantize(q, bits: int, in_features: int = 128) -> torch.Tensor:
    """The matrix a Quantized result stands for (AWQ's s divided back out)."""
    weight = from_codes(unpack_codes(q.packed, bits, in_features), q.scale, q.zero, 32, torch.float32)
    return weight if q.act_scale is None else weight / q.act_scale


def correlated_inputs(n: int, dim: int, outliers: bool = False) -> torch.Tensor:
    """Activations with correlated channels (as real ones are), optionally a few large ones."""
    torch.manual_seed(1)
    x = torch.randn(n, dim) @ (torch.randn(dim, dim) / dim**0.5 + torch.eye(dim))
    if outliers:
        x[:, :4] *= 20
    return x


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello quantized world"] * 10, trainer)
    return tok


@pytest.mark.parametrize("bits", [8, 4])
def test_grid_reconstructs_every_group_within_one_step(bits):
    torch.manual_seed(0)
    weight = torch.randn(24, 72) * torch.logspace(-3, 1, 24)[:, None]  # rows of very different size
    weight[5] = 0.0
    weight[7, :32] += 3.0  # a group that is all positive
    scale, zero = grid_params(weight, bits, 32)  # 72 columns: groups of 32, 32 and a short one of 8
    assert scale.shape == zero.shape == (24, 3)
    codes = to_codes(weight, scale, zero, bits, 32)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    error = (from_codes(codes, scale, zero, 32, torch.float32) - weight).abs()
    step = scale.repeat_interleave(32, dim=1)[:, :72]
    # Rounding error: half a step; the extremes may lose up to one step to the rounded zero point.
    assert (error <= step + 1e-6).all()
    assert (error / step).mean() < 0.3
    assert (from_codes(codes, scale, zero, 32, torch.float32)[5] == 0).all()  # zero stays exactly zero


def test_four_bit_codes_pack_two_to_a_byte():
    codes = torch.randint(0, 16, (3, 5, 9), dtype=torch.uint8)  # odd width: padded by one nibble
    packed = pack_codes(codes, 4)
    assert packed.shape == (3, 5, 5)
    assert torch.equal(unpack_codes(packed, 4, 9), codes)


def test_gptq_keeps_a_layers_output_closer_than_rounding_to_nearest():
    torch.manual_seed(0)
    weight = torch.randn(96, 128) / 128**0.5
    calib, held_out = correlated_inputs(2048, 128).split(1024)
    want = held_out @ weight.T
    error = {
        "rtn": relative_error(held_out @ dequantize(rtn(weight, 4, 32), 4).T, want),
        "gptq": relative_error(held_out @ dequantize(gptq(weight, calib, 4, 32), 4).T, want),
    }
    assert error["gptq"] < 0.8 * error["rtn"], error  # on inputs it did not see


def test_awq_protects_the_channels_with_large_activations():
    torch.manual_seed(0)
    weight = torch.randn(96, 128) / 128**0.5
    x = correlated_inputs(1024, 128, outliers=True)
    want = x @ weight.T
    plain = relative_error(x @ dequantize(rtn(weight, 4, 32), 4).T, want)
    scaled = awq(weight, x, 4, 32)
    assert scaled.act_scale[:4].mean() > scaled.act_scale[4:].mean()  # the outlier channels scaled up
    assert relative_error(x @ dequantize(scaled, 4).T, want) < 0.8 * plain


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_decoder_quantizes_to_the_promised_accuracy_and_size(moe, method):
    torch.manual_seed(0)
    model = Decoder(tiny_config(**(MOE if moe else {}))).eval()
    ids = torch.randint(0, 512, (2, 24))
    calibration = [torch.randint(0, 512, (4, 32))]
    with torch.no_grad():
        want = model(ids).logits
    errors, sizes = {}, {}
    for bits in (8, 4):
        q = quantize_model(copy_of(model), QuantConfig(method, bits, 32), calibration)
        with torch.no_grad():
            errors[bits] = relative_error(q(ids).logits, want)
        sizes[bits] = state_dict_bytes(q)
    assert errors[8] < 0.01 and errors[4] < 0.1, errors
    assert errors[8] < errors[4]
    assert state_dict_bytes(model) > sizes[8] > sizes[4]
    assert isinstance(q.layers[0].attn.wq, QuantizedLinear)
    if moe:
        assert isinstance(q.layers[0].ffn.w_up, QuantizedExperts)
        assert type(q.layers[0].ffn.router) is nn.Linear  # routing stays in full precision
    assert type(q.lm_head) is nn.Linear and q.quantization["method"] == method


def copy_of(model: Decoder) -> Decoder:
    clone = Decoder(model.cfg)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def test_linear_weights_shrink_to_a_quarter_and_an_eighth():
    torch.manual_seed(0)
    model = Decoder(tiny_config(dim=128, head_dim=32, ffn_dim=256))
    linear_fp_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                          if isinstance(m, nn.Linear) and "lm_head" not in n)
    before = state_dict_bytes(model)
    saved = {bits: before - state_dict_bytes(quantize_model(copy_of(model), QuantConfig("rtn", bits, 128)))
             for bits in (8, 4)}
    # per 128 weights: 128 (8-bit) or 64 (4-bit) code bytes + a 4-byte scale + a 1-byte zero
    assert saved[8] == pytest.approx(linear_fp_bytes * (1 - 133 / 512), rel=1e-3)
    assert saved[4] == pytest.approx(linear_fp_bytes * (1 - 69 / 512), rel=1e-3)


@pytest.mark.parametrize("moe,method", [(False, "gptq"), (True, "awq")])
def test_quantized_model_dir_round_trips_with_identical_logits(tmp_path, tokenizer, moe, method):
    torch.manual_seed(0)
    cfg = tiny_config(**MOE) if moe else tiny_config(tie_embeddings=False, qkv_bias=True)
    model = quantize_model(Decoder(cfg).eval(), QuantConfig(method, 4, 32), [torch.randint(0, 512, (2, 16))])
    save_quantized(tmp_path / "q", model, tokenizer, cfg.to_dict(), extra={"source": "unit-test"})

    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"method": method, "bits": 4, "group_size": 32,
                                      "skip": ["lm_head", "embed", "router"]}
    assert config["source"] == "unit-test" and config["model"] == cfg.to_dict()

    loaded, loaded_tokenizer = load_quantized(tmp_path / "q")
    assert loaded_tokenizer.to_str() == tokenizer.to_str()
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert state_dict_bytes(loaded) == state_dict_bytes(model)
    via_loader, _ = load_model(tmp_path / "q")  # the generic loader dispatches on "quantization"
    with torch.no_grad():
        assert torch.equal(via_loader(ids).logits, model(ids).logits)


def test_bad_settings_and_unquantized_saves_are_refused(tmp_path, tokenizer):
    for bad in (QuantConfig("nf4", 4, 128), QuantConfig("rtn", 3, 128), QuantConfig("rtn", 4, -1)):
        with pytest.raises(ValueError):
            quantize_model(Decoder(tiny_config()), bad)
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(Decoder(tiny_config()), QuantConfig("gptq", 4, 128))
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(tmp_path / "q", Decoder(tiny_config()), tokenizer)
    assert not (tmp_path / "q").exists()
