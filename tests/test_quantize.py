"""Int8 weight-only quantization: accuracy, both matmul paths, dense and MoE decoders, model dirs."""

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
    Int8ExpertWeights,
    Int8Linear,
    _int8_kernel_applies,
    int8_state_dict_size_bytes,
    load_quantized,
    quantize_int8,
    quantize_per_channel,
    save_quantized,
)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello quantized world"] * 10, trainer)
    return tok


def test_per_channel_scales_reconstruct_each_row():
    torch.manual_seed(0)
    weight = torch.randn(48, 80) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different size
    weight[5] = 0.0
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert q.abs().amax(dim=1)[torch.arange(48) != 5].eq(127).all()  # each row uses the full range
    error = (q.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-9).all()  # at most half a step per element
    assert (q[5] == 0).all()


def test_int8_linear_matches_float_linear_within_one_percent():
    torch.manual_seed(0)
    linear = nn.Linear(256, 384, bias=True)
    x = torch.randn(4, 7, 256)
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (384,)
    with torch.no_grad():
        assert relative_error(q(x), linear(x)) < 0.01


@pytest.mark.parametrize("in_features", [64, 36])  # 36: not a multiple of 8, must not take the int8 kernel
def test_bf16_int8_kernel_and_dequantize_paths_agree(in_features):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 96).to(torch.bfloat16)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(3, 5, in_features, dtype=torch.bfloat16)
    assert _int8_kernel_applies(x, in_features) == (in_features == 64 and hasattr(torch, "_weight_int8pack_mm"))
    with torch.no_grad():
        fast = q(x)
        dequantized = nn.functional.linear(x.float(), q.weight.float() * q.scale.float()[:, None], q.bias.float())
        reference = linear(x)
    assert fast.dtype == torch.bfloat16 and fast.shape == (3, 5, 96)
    assert relative_error(fast, dequantized) < 0.01
    assert relative_error(fast, reference) < 0.02


def test_quantize_sequential_replaces_linears_but_skipped_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.Linear(64, 16))
    x = torch.randn(8, 32)
    with torch.no_grad():
        want = model(x)
        quantize_int8(model, skip=("2",))
        got = model(x)
    assert [type(m).__name__ for m in model] == ["Int8Linear", "GELU", "Linear", "Int8Linear"]
    assert relative_error(got, want) < 0.01
    assert model.quantization == {"method": "int8-weight-only", "skip": ["2"]}


def test_dense_decoder_quantizes_linear_weights_to_a_quarter():
    torch.manual_seed(0)
    model = Decoder(tiny_config()).eval()
    ids = torch.randint(0, 512, (2, 24))
    linear_fp_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                          if isinstance(m, nn.Linear) and "lm_head" not in n)
    before = int8_state_dict_size_bytes(model)
    with torch.no_grad():
        want = model(ids).logits
        quantize_int8(model)
        got = model(ids).logits
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.tok_embeddings.weight
    saved = before - int8_state_dict_size_bytes(model)
    # int8 (1 byte) + one fp32 scale per row in place of 4 bytes per weight: ~3/4 saved.
    assert 0.72 * linear_fp_bytes < saved < 0.75 * linear_fp_bytes
    assert relative_error(got, want) < 0.01
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


def test_moe_expert_weights_are_quantized_per_expert_and_channel():
    torch.manual_seed(0)
    cfg = tiny_config(family="qwen3_moe", qk_norm=True, n_experts=4, n_experts_per_token=2, moe_ffn_dim=48)
    model = Decoder(cfg).eval()
    ids = torch.randint(0, 512, (2, 24))
    w_up = model.layers[0].ffn.w_up.detach().clone()
    with torch.no_grad():
        want = model(ids).logits
        quantize_int8(model)
        got = model(ids).logits
    experts = model.layers[0].ffn.w_up
    assert isinstance(experts, Int8ExpertWeights) and experts.scale.shape == (4, 48)
    assert relative_error(experts[2], w_up[2]) < 0.01
    assert isinstance(model.layers[0].ffn.router, nn.Linear)  # routing stays in full precision
    assert relative_error(got, want) < 0.01


@pytest.mark.parametrize("moe", [False, True])
def test_quantized_model_dir_round_trips_with_identical_logits(tmp_path, tokenizer, moe):
    torch.manual_seed(0)
    cfg = tiny_config(n_experts=4, moe_ffn_dim=48) if moe else tiny_config(tie_embeddings=False, qkv_bias=True)
    model = quantize_int8(Decoder(cfg).eval())
    save_quantized(tmp_path / "q", model, tokenizer, cfg.to_dict(), extra={"source": "unit-test"})

    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"method": "int8-weight-only", "skip": ["lm_head", "embed", "router"]}
    assert config["source"] == "unit-test" and config["model"] == cfg.to_dict()

    loaded, loaded_tokenizer = load_quantized(tmp_path / "q")
    assert loaded_tokenizer.to_str() == tokenizer.to_str()
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert int8_state_dict_size_bytes(loaded) == int8_state_dict_size_bytes(model)
    via_loader, _ = load_model(tmp_path / "q")  # the generic loader dispatches on "quantization"
    with torch.no_grad():
        assert torch.equal(via_loader(ids).logits, model(ids).logits)


def test_saving_an_unquantized_model_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(tmp_path / "q", Decoder(tiny_config()), tokenizer)
    assert not (tmp_path / "q").exists()
