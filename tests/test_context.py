"""Context extension pieces: dynamic NTK RoPE and the passkey-retrieval probe."""

from __future__ import annotations

import pytest
import torch

from llm_lifecycle.evals.passkey import passkey_retrieval
from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder, RotaryEmbedding

BASE = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)


def test_dynamic_ntk_keeps_short_inputs_and_grows_the_base_past_the_original_length():
    plain = RotaryEmbedding(ModelConfig(**BASE))
    dynamic = RotaryEmbedding(ModelConfig(**BASE, rope_scaling={"type": "dynamic", "factor": 4.0,
                                                                 "original_max_seq_len": 16}))
    (cos_p, sin_p), = plain(0, 16, torch.device("cpu"))
    (cos_d, sin_d), = dynamic(0, 16, torch.device("cpu"))
    assert torch.equal(cos_p, cos_d) and torch.equal(sin_p, sin_d)  # within the original length
    (cos_long, _), = dynamic(0, 48, torch.device("cpu"))
    dim = 8  # head_dim 8
    base = 10_000.0 * (4.0 * 48 / 16 - 3.0) ** (dim / (dim - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.arange(48).float()[:, None] * inv_freq
    torch.testing.assert_close(cos_long[:, 0, : dim // 2], angles.cos())
    (cos_again, _), = dynamic(0, 16, torch.device("cpu"))
    assert torch.equal(cos_again, cos_p)  # back to a short input: the original base again


def test_passkey_probe_scores_the_key_tokens():
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**BASE))
    encode = lambda text: [ord(c) % 97 for c in text]  # noqa: E731 - a character-level tokenizer
    filler = encode("The grass is green. The sky is blue. The sun is yellow. Here we go. " * 20)
    result = passkey_retrieval(model, encode, filler, seq_len=160, trials=3)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["key_logprob"] < 0
    with pytest.raises(ValueError, match="no room"):
        passkey_retrieval(model, encode, filler, seq_len=40, trials=1)
