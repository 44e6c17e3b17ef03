"""GGUF export: llama.cpp (through llama-cpp-python) loads the file, tokenizes as we do, and
its logits and greedy continuation match ours; the file carries the tokenizer and chat
template; an Ollama Modelfile sits beside it."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import needs
from llm_lifecycle.models.checkpoint import save_model_dir
from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder
from llm_lifecycle.models.generate import generate
from llm_lifecycle.models.gguf import ARCHS, gguf_arch, gguf_tensors, write_gguf
from llm_lifecycle.models.hf import chatml_template
from llm_lifecycle.models.presets import list_presets, load_preset
from llm_lifecycle.workflows.stages.export import export_model, llama_cpp_logits, llama_cpp_quiet
from llm_lifecycle.workflows.runner.stage import UserError
from llm_lifecycle.workflows.data.bpe import train_bpe

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Numbers like 12345 and 2026 are split into digits. The early bird catches the worm. "
)
PROMPT = "The quick brown fox"
TINY = dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)

# One case per llama.cpp architecture we write: the family and its distinguishing knobs at a tiny size.
CASES = {
    "llama": dict(family="llama"),
    "qwen2": dict(family="qwen2", qkv_bias=True),
    "qwen3": dict(family="qwen3", qk_norm=True),
    "qwen3moe": dict(family="qwen3_moe", qk_norm=True, n_experts=4, n_experts_per_token=2, moe_ffn_dim=64,
                     tie_embeddings=False),
    "qwen2moe": dict(family="qwen2_moe", qkv_bias=True, n_experts=4, n_experts_per_token=2, moe_ffn_dim=32,
                     n_shared_experts=2, shared_expert_gate=True, norm_topk_prob=False, tie_embeddings=False),
    "gemma": dict(family="gemma", mlp="geglu", scale_embeddings=True, head_dim=24, n_kv_heads=1),
    # Gemma 2: post-norms, a window in the even layers shorter than the prompts, soft caps small
    # enough to bend the attention scores and logits of these tiny models
    "gemma2": dict(family="gemma2", mlp="geglu", scale_embeddings=True, post_norms=True, head_dim=24, n_kv_heads=1,
                   sliding_window=[8, None], attn_logit_softcap=5.0, final_logit_softcap=10.0),
    "phi3": dict(family="phi3", tie_embeddings=False),
    # Phi-3's LongRoPE: factors of each kind uneven, so a swap or a misplaced list shows
    "phi3 (longrope)": dict(family="phi3", tie_embeddings=False, max_seq_len=512, rope_scaling=dict(
        type="longrope", factor=2.0, original_max_seq_len=256, short_factor=[1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0],
        long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 8.0, 12.0, 16.0])),
    "phi2": dict(family="phi", norm="layernorm", mlp="gelu", parallel_block=True, rotary_pct=0.5, qkv_bias=True,
                 o_bias=True, mlp_bias=True, head_bias=True, tie_embeddings=False),
    # Qwen 1: multi-head, windows in the lower layer and LogN past 48 tokens (the file's context)
    "qwen": dict(family="qwen", n_kv_heads=4, qkv_bias=True, sliding_window=48, window_layers=1, logn_train_len=48,
                 tie_embeddings=False),
    "chatglm": dict(family="chatglm", rope_2d=True, qkv_bias=True, tie_embeddings=False),
    "chatglm (glm)": dict(family="glm", rotary_pct=0.5, qkv_bias=True, tie_embeddings=False),
    "glm4": dict(family="glm4", post_norms=True, rotary_pct=0.5, qkv_bias=True, tie_embeddings=False),
    "internlm2": dict(family="internlm2", tie_embeddings=False),
    "llama (internlm3)": dict(family="internlm3", tie_embeddings=False),
    # Baichuan 2 13B: llama.cpp's baichuan runs ALiBi at 40 layers and no other depth (it reads no
    # key for it); other depths go through refact. Narrow, so 40 layers train in about 10 s.
    "baichuan": dict(family="baichuan", position="alibi", norm_head=True, n_kv_heads=2, n_layers=40, dim=32,
                     n_heads=2, ffn_dim=64, tie_embeddings=False),
    # Baichuan 2 7B: llama.cpp's baichuan runs RoPE at 32 layers (interleaved pairs, NormHead folded)
    "baichuan (7b)": dict(family="baichuan", norm_head=True, n_layers=32, dim=32, n_heads=2, n_kv_heads=2, ffn_dim=64,
                          tie_embeddings=False),
    "refact": dict(family="baichuan", position="alibi", norm_head=True, n_kv_heads=4, tie_embeddings=False),
    "llama (mistral)": dict(family="mistral", sliding_window=32, tie_embeddings=False),
    "llama (mixtral)": dict(family="mixtral", n_experts=4, n_experts_per_token=2, moe_ffn_dim=64, tie_embeddings=False),
    # DeepSeek-V2 with expert groups, as the full-size preset (softmax router; groups ranked by their best two)
    "deepseek2": dict(family="deepseek_v2", n_kv_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                      v_head_dim=8, n_experts=8, n_experts_per_token=2, moe_ffn_dim=16, n_shared_experts=2,
                      n_dense_layers=1, n_expert_groups=4, topk_groups=2, routed_scale=1.5, norm_topk_prob=False,
                      tie_embeddings=False),
    "deepseek2 (v3)": dict(family="deepseek_v3", n_kv_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                           qk_rope_head_dim=4, v_head_dim=8, n_experts=8, n_experts_per_token=3, moe_ffn_dim=16,
                           n_shared_experts=1, n_dense_layers=1, router_score="sigmoid", router_bias=True,
                           n_expert_groups=4, topk_groups=2, routed_scale=2.5, tie_embeddings=False),
}
# DeepSeek's YaRN as the released V2 writes it (mscale = mscale_all_dim), past its original 16 tokens
CASES["deepseek2 (yarn)"] = {**CASES["deepseek2"], "rope_scaling": dict(
    type="yarn", factor=4.0, original_max_seq_len=16, mscale=0.707, mscale_all_dim=0.707)}


def test_every_llama_cpp_architecture_we_write_has_a_case():
    assert {name.split()[0] for name in CASES} == set(ARCHS)
    assert {gguf_arch(ModelConfig(**{**TINY, **knobs})).name for knobs in CASES.values()} == set(ARCHS)


# Every preset's llama.cpp architecture, as docs/models.md's GGUF column names it (each has a case above).
PRESET_ARCHS = {
    "llama": ["llama-small", "llama1-small", "llama1-65b", "llama2-small", "llama2-7b", "llama3-small", "llama3-8b",
              "yi-small", "yi-6b", "yi-34b", "mistral-small", "mistral-7b", "mixtral-small", "mixtral-8x7b",
              "internlm3-small", "internlm3-8b", "baichuan-small", "baichuan2-small"],
    "qwen": ["qwen-small", "qwen-7b"],
    "qwen2": ["qwen2-small", "qwen2-7b", "qwen2.5-small", "qwen2.5-72b"],
    "qwen2moe": ["qwen2-moe-small", "qwen2-57b-a14b"],
    "qwen3": ["qwen3-small"],
    "qwen3moe": ["qwen3-moe-small", "qwen3-30b-a3b"],
    "gemma": ["gemma-small", "gemma-7b"],
    "gemma2": ["gemma2-small", "gemma2-9b"],
    "phi2": ["phi-small", "phi-2"],
    "phi3": ["phi3-mini-small", "phi3-mini"],
    "chatglm": ["chatglm-small", "chatglm3-6b", "glm4-small", "glm4-9b"],
    "internlm2": ["internlm2-small", "internlm2-7b"],
    "baichuan": ["baichuan-7b", "baichuan-13b", "baichuan2-7b", "baichuan2-13b"],  # 32 layers: RoPE, 40: ALiBi
    "refact": ["baichuan-alibi-small", "baichuan2-alibi-small"],
    "deepseek2": ["deepseek-v2-small", "deepseek-v3-small", "deepseek-v3"],
    None: ["phi3-small-small", "phi3-small-7b"],  # llama.cpp has no Phi-3-small (block-sparse attention, muP)
    # DeepSeek-V2's groups ranked by their best expert: llama.cpp's deepseek2 ranks them by the best two
    "refused": ["deepseek-v2"],
}


def test_every_preset_exports_to_the_llama_cpp_architecture_the_docs_name():
    def arch(preset: str) -> str | None:
        try:
            return gguf_arch(ModelConfig(**load_preset(preset))).name
        except ValueError as err:
            if "has no GGUF form" in str(err):
                return "refused"
            assert "has no llama.cpp architecture" in str(err)
            return None

    archs = {preset: arch(preset) for preset in list_presets()}
    assert archs == {preset: arch for arch, presets in PRESET_ARCHS.items() for preset in presets}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Matrices this small gain nothing from a second thread, and OpenMP's waiting threads
    collapse on a shared machine: training the 40-layer baichuan case took 9 s on one thread
    and 112 s on two (2 cores, load 3-4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT] * 20, vocab_size=320)


def trained_model(tokenizer, case: str, lengths: tuple[int, ...] = (97,)) -> Decoder:
    """A tiny model trained until it continues TEXT confidently, so a greedy continuation is a
    real check (an untrained model's near-tied logits would flip on rounding noise); each step
    on one sequence of each of `lengths` tokens."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "vocab_size": tokenizer.get_vocab_size(), **CASES[case]})
    model = Decoder(cfg)
    text = tokenizer.encode(TEXT * 8).ids
    sequences = [torch.tensor(text[:n]) for n in lengths]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):  # untied heads need more than 60 steps
        losses = [F.cross_entropy(model(ids[None, :-1]).logits[0], ids[1:]) for ids in sequences]
        optimizer.zero_grad()
        sum(losses).backward()
        optimizer.step()
    assert max(loss.item() for loss in losses) < 0.5, "the tiny model did not learn the text"
    return model.eval()


def needs_llama_cpp() -> None:
    needs(importlib.util.find_spec("llama_cpp") is not None, "llama-cpp-python (a source build)",
          """CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install -c c.txt -e '.[llamacpp]'""")


def llama_cpp_greedy(gguf_file, prompt_ids: list[int], n: int, n_ctx: int = 128) -> list[int]:
    from llama_cpp import Llama

    with llama_cpp_quiet():
        llm = Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_threads=1, verbose=False)
        out = [int(t) for t in itertools.islice(llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0), n)]
        llm.close()
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_computes_our_logits_from_an_f32_file(tmp_path, tokenizer, case, capfd):
    """The mapping alone, fast: random weights, no rounding but llama.cpp's F16 key/value cache;
    and llama.cpp prints nothing (its 256-token context passes most of these files' length)."""
    needs_llama_cpp()
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**{**TINY, "vocab_size": tokenizer.get_vocab_size(), **CASES[case]})).eval()
    ids = tokenizer.encode(TEXT).ids[:30]  # inside the windows llama.cpp does not run, past Gemma 2's
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))  # norms and biases away from 1 and 0
        ours = model(torch.tensor([ids])).logits[0].numpy()
    gguf_file = write_gguf(tmp_path / "model.gguf", model.cfg, model.state_dict(), tokenizer, "f32")
    capfd.readouterr()
    assert np.abs(llama_cpp_logits(gguf_file, ids) - ours).max() < 0.002 * np.abs(ours).max()
    assert capfd.readouterr() == ("", "")


def q8_0_round(x: torch.Tensor) -> torch.Tensor:
    """x as llama.cpp's Q8_0 holds it: blocks of 32 along the last dim, int8 codes scaled by the
    block's max / 127 (the scale itself F16); a row that is no whole number of blocks is F16."""
    if x.shape[-1] % 32:
        return x.half().to(x.dtype)
    blocks = x.float().unflatten(-1, (-1, 32))
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    codes = torch.round(blocks / scale.clamp_min(torch.finfo(torch.float32).tiny))
    return (codes * scale.half().float()).flatten(-2).to(x.dtype)


class Int8Activations(torch.overrides.TorchFunctionMode):
    """llama.cpp's CPU dot products with Q8_0 weights quantize their input to Q8_0 too (F16
    weights take F16 inputs): the same rounding on the input of every projection but the F32 ones."""

    def __init__(self, f32_weights: list[torch.Tensor]):
        super().__init__()
        self.f32_weights = f32_weights

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and not any(args[1] is w for w in self.f32_weights) or func in (torch.bmm, torch._grouped_mm):
            args = (q8_0_round(args[0]), *args[1:])
        return func(*args, **(kwargs or {}))


def logits_as_llama_cpp_runs_q8_0(model: Decoder, ids: list[int]) -> np.ndarray:
    """Our logits computed on what a Q8_0 file holds (the rounded weights; norms, biases and the
    routers F32) with llama.cpp's int8 activations: the reference its Q8_0 logits are held to, so
    the bound measures the mapping, not how much a model's routing or norms amplify int8 rounding."""
    model = copy.deepcopy(model)
    f32 = [p for name, p in model.named_parameters() if name.endswith(("router.weight", "shared_gate.weight"))]
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2 and not any(param is w for w in f32):
                param.copy_(q8_0_round(param))
        with Int8Activations(f32):
            return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_runs_our_gguf_with_our_logits_and_continuation(tmp_path, tokenizer, case, record_property):
    """Each case's figures (share of the largest logit) are test properties, which
    `-o junit_family=xunit1 --junitxml=FILE` keeps."""
    needs_llama_cpp()
    import llama_cpp

    model = trained_model(tokenizer, case)
    model_dir = save_model_dir(tmp_path / "model", model, tokenizer)
    prompt = tokenizer.encode(PROMPT).ids
    with torch.no_grad():
        ours = model(torch.tensor([prompt])).logits[0].numpy()
    ours_greedy = generate(model, [prompt], max_new_tokens=12)[0]

    # F16: weights rounded to half precision (and llama.cpp's F16 key/value cache), within 0.2%
    # of the largest logit of ours. Q8_0: within 2% of ours computing on the file's int8 weights
    # with llama.cpp's int8 activations (measured 0.19-0.98% on every case; 0.35-1.72% against our
    # exact logits, and up to 4.3% where int8 rounding flips DeepSeek-V3's sigmoid routing; a Q4_0
    # file or two experts swapped are 5% and 20% off it). F16 measured 0.02-0.11%.
    references = {"f16": ours, "q8_0": logits_as_llama_cpp_runs_q8_0(model, prompt)}
    for gguf_type, tolerance in (("f16", 0.002 * np.abs(ours).max()), ("q8_0", 0.02 * np.abs(ours).max())):
        export_model(str(model_dir), tmp_path / gguf_type, "gguf", gguf_type)
        gguf_file = tmp_path / gguf_type / f"{gguf_type}-{gguf_type}.gguf"
        theirs = llama_cpp_logits(gguf_file, prompt)
        difference = np.abs(theirs - references[gguf_type]).max()
        record_property(f"{gguf_type}_vs_reference", round(float(difference / np.abs(ours).max()), 5))
        record_property(f"{gguf_type}_vs_exact", round(float(np.abs(theirs - ours).max() / np.abs(ours).max()), 5))
        assert difference < tolerance, (gguf_type, difference / np.abs(ours).max())
        assert llama_cpp_greedy(gguf_file, prompt, 12) == ours_greedy, gguf_type

    # llama.cpp splits and merges text exactly as our tokenizer does (the "refact" pre-tokenizer).
    llm = llama_cpp.Llama(model_path=str(tmp_path / "f16" / "f16-f16.gguf"), n_ctx=128, verbose=False)
    for text in (TEXT, "Digits 0042 and <|im_start|>user\nhi<|im_end|>"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text).ids
    llm.close()


def test_llama_cpp_runs_longrope_within_and_past_the_original_length_by_its_context_size(tmp_path, tokenizer):
    """Phi-3's LongRoPE (original length 256): we pick the factor list by the sequence's length,
    llama.cpp by the context it is given (rounded up to 256 tokens): the long list once that
    context passes the original length, whatever the prompt. Trained on 200 tokens (short
    factors) and 330 (long ones), so both continuations are confident."""
    needs_llama_cpp()
    model = trained_model(tokenizer, "phi3 (longrope)", lengths=(200, 330))
    export_model(str(save_model_dir(tmp_path / "model", model, tokenizer)), tmp_path / "f16", "gguf", "f16")
    gguf_file = tmp_path / "f16" / "f16-f16.gguf"
    text = tokenizer.encode(TEXT * 8).ids
    within, past = text[:200], text[:300]
    # ours with the long factors at every length: what llama.cpp computes in a context past 256
    scaling = model.cfg.rope_scaling
    long_only = Decoder(dataclasses.replace(model.cfg, rope_scaling={**scaling, "short_factor": scaling["long_factor"]}))
    long_only.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours_within, ours_past = (model(torch.tensor([ids])).logits[0].numpy() for ids in (within, past))
        ours_within_long = long_only.eval()(torch.tensor([within])).logits[0].numpy()

    def off(theirs, ours):  # as a fraction of our largest logit
        return np.abs(theirs - ours).max() / np.abs(ours).max()

    assert off(llama_cpp_logits(gguf_file, within, n_ctx=256), ours_within) < 0.002  # short factors both
    assert off(llama_cpp_logits(gguf_file, past, n_ctx=512), ours_past) < 0.002  # long factors both
    # a prompt within the original length in a 512-token context: llama.cpp's long factors, not our short ones
    theirs = llama_cpp_logits(gguf_file, within, n_ctx=512)
    assert off(theirs, ours_within_long) < 0.002 and off(theirs, ours_within) > 0.05
    # greedy: 200 + 12 tokens stay within the original length, 300 + 12 past it
    for prompt, n_ctx in ((within, 256), (past, 512)):
        assert llama_cpp_greedy(gguf_file, prompt, 12, n_ctx=n_ctx) == generate(model, [prompt], max_new_tokens=12)[0]


@pytest.mark.parametrize("preset", ["qwen-small", "chatglm-small", "baichuan2-alibi-small"])
def test_presets_without_a_transformers_layout_export_to_gguf(tmp_path, tokenizer, preset):
    """Qwen 1 (LogN, windows), ChatGLM (2D positions) and Baichuan 2 13B (ALiBi) have no
    transformers class that computes them; llama.cpp's qwen, chatglm and refact do."""
    needs_llama_cpp()
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**{**load_preset(preset), "vocab_size": tokenizer.get_vocab_size(), "n_layers": 2})).eval()
    model_dir = save_model_dir(tmp_path / "model", model, tokenizer)
    with pytest.raises(UserError, match="cannot hold"):
        export_model(str(model_dir), tmp_path / "hf", "hf")
    export_model(str(model_dir), tmp_path / "gguf", "gguf", "f32")
    ids = tokenizer.encode(TEXT).ids[:60]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llama_cpp_logits(tmp_path / "gguf" / "gguf-f32.gguf", ids) - ours).max() < 0.002 * np.abs(ours).max()


def test_gguf_carries_tokenizer_chat_template_and_a_modelfile(tmp_path, tokenizer):
    from gguf import GGUFReader, TokenType

    model = Decoder(ModelConfig(vocab_size=tokenizer.get_vocab_size(), dim=64, n_layers=2, n_heads=4,
                                n_kv_heads=2, ffn_dim=96, max_seq_len=64))
    model_dir = save_model_dir(tmp_path / "model", model, tokenizer, extra={"system_prompt": "Be brief."})
    export_model(str(model_dir), tmp_path / "tiny", "gguf", "q4_0")
    reader = GGUFReader(tmp_path / "tiny" / "tiny-q4_0.gguf")

    def field(key):
        f = reader.fields[key]
        return f.contents()

    assert field("general.architecture") == "llama"
    assert field("tokenizer.chat_template") == chatml_template("Be brief.")  # the fine-tuning prompt by default
    assert field("tokenizer.ggml.pre") == "refact"
    assert field("tokenizer.ggml.tokens")[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # ChatML's tokens are control tokens, the chat markup (<think>, <tool_call>, ...) user-defined
    assert field("tokenizer.ggml.token_type")[:10] == [TokenType.CONTROL] * 3 + [TokenType.USER_DEFINED] * 6 + [
        TokenType.NORMAL]
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.token_to_id("<|im_end|>")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert len(reader.tensors) == len(gguf_tensors(model.cfg, model.state_dict()))
    modelfile = (tmp_path / "tiny" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-q4_0.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """Be brief."""' in modelfile


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
    # LongRoPE extended from 128 tokens: llama.cpp's smallest context (256) already takes the long factors
    longrope = {**CASES["phi3 (longrope)"]["rope_scaling"], "original_max_seq_len": 128}
    with pytest.raises(ValueError, match="original_max_seq_len=128 it would never compute them"):
        gguf_arch(ModelConfig(**{**TINY, **CASES["phi3 (longrope)"], "rope_scaling": longrope}))


def test_gguf_export_refuses_deepseek_v2_groups_ranked_by_their_best_expert(tmp_path, tokenizer):
    """llama.cpp's deepseek2 ranks expert groups by their two best experts and reads no key for
    V2's rule (its best expert): `llm export --format gguf` refuses in one line, exit 2."""
    from typer.testing import CliRunner

    from llm_lifecycle.cli.app import app

    case = {**TINY, **CASES["deepseek2"], "vocab_size": tokenizer.get_vocab_size()}
    assert gguf_arch(ModelConfig(**case)).name == "deepseek2"  # the same groups ranked by their best two export
    model_dir = save_model_dir(tmp_path / "model", Decoder(ModelConfig(**case, expert_group_score="max")), tokenizer)
    result = CliRunner().invoke(app, ["export", "--model", str(model_dir), "--out", str(tmp_path / "out"),
                                      "--format", "gguf"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert "expert_group_score top2_sum" in result.output and "'max'" in result.output
    assert not (tmp_path / "out").exists()


def test_llama_cpp_ranks_deepseek2_expert_groups_by_their_best_two(tmp_path, tokenizer):
    """Why V2's rule is refused: on the same weights, llama.cpp's logits are those of groups ranked
    by their best two experts, far from those of groups ranked by their best one."""
    needs_llama_cpp()
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**{**TINY, "vocab_size": tokenizer.get_vocab_size(), **CASES["deepseek2"]})).eval()
    v2_rule = Decoder(dataclasses.replace(model.cfg, expert_group_score="max")).eval()
    ids = tokenizer.encode(TEXT).ids[:30]
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        v2_rule.load_state_dict(model.state_dict())
        ours, best_one = (m(torch.tensor([ids])).logits[0].numpy() for m in (model, v2_rule))
    theirs = llama_cpp_logits(write_gguf(tmp_path / "model.gguf", model.cfg, model.state_dict(), tokenizer, "f32"), ids)
    scale = np.abs(ours).max()
    assert np.abs(theirs - ours).max() < 0.002 * scale
    assert np.abs(theirs - best_one).max() > 0.02 * scale, np.abs(theirs - best_one).max() / scale


@pytest.mark.parametrize("scaling", [dict(), dict(mscale=1.0, mscale_all_dim=0.707)])
def test_deepseek2_gguf_holds_yarn_only_as_deepseek_writes_it(scaling):
    """llama.cpp's deepseek2 leaves cos/sin unscaled and sharpens every score: plain YaRN (ours
    scales cos/sin) and unequal mscales compute otherwise there, so export refuses them."""
    yarn = dict(type="yarn", factor=4.0, original_max_seq_len=16, **scaling)
    with pytest.raises(ValueError, match="runs YaRN as DeepSeek's with mscale = mscale_all_dim"):
        gguf_arch(ModelConfig(**{**TINY, **CASES["deepseek2"], "rope_scaling": yarn}))


@pytest.mark.parametrize("change, message", [
    (dict(sliding_window=[None, 8]), "windows the even layers"),
    (dict(sliding_window=[8, 8]), "windows the even layers"),
    (dict(query_pre_attn_scalar=16), "query_pre_attn_scalar=24"),
    (dict(attn_logit_softcap=None), "always soft-caps"),
])
def test_gemma2_export_refuses_what_llama_cpp_computes_otherwise(change, message):
    """llama.cpp's gemma2 fixes the window alternation, the query scale and the soft caps."""
    assert gguf_arch(ModelConfig(**{**TINY, **CASES["gemma2"]})).name == "gemma2"
    with pytest.raises(ValueError, match=message):
        gguf_arch(ModelConfig(**{**TINY, **CASES["gemma2"], **change}))
