"""GGUF export: llama.cpp (through llama-cpp-python) loads the file, tokenizes as we do, and
its logits and greedy continuation match ours; the file carries the tokenizer and chat
template; an Ollama Modelfile sits beside it."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import needs
from llm_lifecycle.models.checkpoint import save_model_dir
from llm_lifecycle.models.config import FAMILIES, ModelConfig
from llm_lifecycle.models.decoder import Decoder
from llm_lifecycle.models.generate import generate
from llm_lifecycle.models.gguf import ARCHS, gguf_tensors
from llm_lifecycle.models.hf import CHATML_TEMPLATE
from llm_lifecycle.workflows.export import export_model, llama_cpp_logits
from llm_lifecycle.workflows.stage import UserError
from llm_lifecycle.workflows.tokenizer import train_bpe

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Numbers like 12345 and 2026 are split into digits. The early bird catches the worm. "
)
PROMPT = "The quick brown fox"

# Each family's distinguishing knobs at a tiny size (families llama.cpp knows and ours has).
FAMILY_KNOBS = {
    "llama": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "qwen3_moe": {"qk_norm": True, "n_experts": 4, "n_experts_per_token": 2, "moe_ffn_dim": 64, "tie_embeddings": False},
}
TESTED = [f for f in FAMILY_KNOBS if f in FAMILIES and f in ARCHS]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT] * 20, vocab_size=320)


def trained_model(tokenizer, family: str) -> Decoder:
    """A tiny model trained until it continues TEXT confidently, so a greedy continuation is a
    real check (an untrained model's near-tied logits would flip on rounding noise)."""
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=tokenizer.get_vocab_size(), dim=64, n_layers=2, n_heads=4,
                      n_kv_heads=2, ffn_dim=128, max_seq_len=128, **FAMILY_KNOBS[family])
    model = Decoder(cfg)
    ids = torch.tensor(tokenizer.encode(TEXT * 3).ids[:97])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        logits = model(ids[None, :-1]).logits[0]
        loss = F.cross_entropy(logits, ids[1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5, "the tiny model did not learn the text"
    return model.eval()


def llama_cpp_greedy(gguf_file, prompt_ids: list[int], n: int) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_file), n_ctx=128, n_threads=1, verbose=False)
    out = [int(t) for t in itertools.islice(llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0), n)]
    llm.close()
    return out


@pytest.mark.parametrize("family", TESTED)
def test_llama_cpp_runs_our_gguf_with_our_logits_and_continuation(tmp_path, tokenizer, family):
    needs(importlib.util.find_spec("llama_cpp") is not None, "llama-cpp-python (a source build)",
          """CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install -c c.txt -e '.[llamacpp]'""")
    import llama_cpp

    model = trained_model(tokenizer, family)
    model_dir = save_model_dir(tmp_path / "model", model, tokenizer)
    prompt = tokenizer.encode(PROMPT).ids
    with torch.no_grad():
        ours = model(torch.tensor([prompt])).logits[0].numpy()
    ours_greedy = generate(model, [prompt], max_new_tokens=12)[0]

    # F16: weights rounded to half precision, within 1e-2. Q8_0: llama.cpp also rounds the
    # activations to 8 bits for its int8 dot products: within 2% of the largest logit.
    for gguf_type, tolerance in (("f16", 1e-2), ("q8_0", 0.02 * np.abs(ours).max())):
        export_model(str(model_dir), tmp_path / gguf_type, "gguf", gguf_type)
        gguf_file = tmp_path / gguf_type / f"{gguf_type}-{gguf_type}.gguf"
        theirs = llama_cpp_logits(gguf_file, prompt)
        assert np.abs(theirs - ours).max() < tolerance, (gguf_type, np.abs(theirs - ours).max())
        assert llama_cpp_greedy(gguf_file, prompt, 12) == ours_greedy, gguf_type

    # llama.cpp splits and merges text exactly as our tokenizer does (the "refact" pre-tokenizer).
    llm = llama_cpp.Llama(model_path=str(tmp_path / "f16" / "f16-f16.gguf"), n_ctx=128, verbose=False)
    for text in (TEXT, "Digits 0042 and <|im_start|>user\nhi<|im_end|>"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text).ids
    llm.close()


def test_gguf_carries_tokenizer_chat_template_and_a_modelfile(tmp_path, tokenizer):
    from gguf import GGUFReader

    model = Decoder(ModelConfig(vocab_size=tokenizer.get_vocab_size(), dim=64, n_layers=2, n_heads=4,
                                n_kv_heads=2, ffn_dim=96, max_seq_len=64))
    model_dir = save_model_dir(tmp_path / "model", model, tokenizer)
    export_model(str(model_dir), tmp_path / "tiny", "gguf", "q4_0")
    reader = GGUFReader(tmp_path / "tiny" / "tiny-q4_0.gguf")

    def field(key):
        f = reader.fields[key]
        return f.contents()

    assert field("general.architecture") == "llama"
    assert field("tokenizer.chat_template") == CHATML_TEMPLATE
    assert field("tokenizer.ggml.pre") == "refact"
    assert field("tokenizer.ggml.tokens")[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.token_to_id("<|im_end|>")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert len(reader.tensors) == len(gguf_tensors(model.cfg, model.state_dict()))
    modelfile = (tmp_path / "tiny" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-q4_0.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_gguf_export_refuses_what_llama_cpp_cannot_run(tmp_path, tokenizer):
    model = Decoder(ModelConfig(vocab_size=tokenizer.get_vocab_size(), dim=64, n_layers=1, n_heads=4,
                                n_kv_heads=2, ffn_dim=96, max_seq_len=64, rope_scaling={"type": "llama3", "factor": 2.0,
                                                                                         "original_max_seq_len": 32}))
    model_dir = save_model_dir(tmp_path / "model", model, tokenizer)
    with pytest.raises(UserError, match="llama3"):
        export_model(str(model_dir), tmp_path / "out", "gguf", "f16")
    with pytest.raises(UserError, match="q2_k"):
        export_model(str(model_dir), tmp_path / "out", "gguf", "q2_k")
    assert not (tmp_path / "out").exists()
