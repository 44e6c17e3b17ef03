"""GGUF export for llama.cpp and Ollama, written with the `gguf` package.

One file holds the weights (F32, F16, Q8_0 or Q4_0), the hyperparameters under the llama.cpp
architecture's keys, the tokenizer (byte-level BPE: tokens, types, merges, the pre-tokenizer
llama.cpp must split text with) and the ChatML chat template. An Ollama Modelfile is written
beside it.

Layout facts that carry over from llama.cpp's own converter (convert_hf_to_gguf.py):
- Some llama.cpp architectures (llama, baichuan, internlm2, chatglm, glm4, deepseek2) rotate interleaved pairs
  (x0, x1), (x2, x3), ... with RoPE while we rotate the two halves of the rotated dims;
  permuting the rows of the q and k projections head by head makes the two the same. The
  others (qwen*, gemma, gemma2, phi2, phi3) use the half-rotation (NeoX) form and need no permutation.
- Quantized GGUF types work on blocks of 32 along a row: a tensor whose rows are not a whole
  number of blocks is written as F16; norms, biases and the MoE router stay F32.
- llama.cpp picks Baichuan's RoPE or ALiBi variant by the depth (32 layers: 7B, RoPE; 40:
  13B, ALiBi; its baichuan reads no key for it) and at other depths runs neither; Baichuan
  models of other depths are written as llama (RoPE) or refact (llama.cpp's llama-with-ALiBi),
  which compute the same.

Phi-3's LongRoPE goes in as llama.cpp's converter writes it: the short and long factor lists as
the tensors rope_factors_short/rope_factors_long, the original length and LongRoPE's cos/sin scale
sqrt(1 + ln s / ln L) as metadata. llama.cpp picks the list by the context it is given, not by the
sequence: the long factors whenever the context (a multiple of 256 tokens) passes the original
length, even for a short prompt, where we (and transformers) use the short ones. So our logits are
llama.cpp's for a prompt within the original length in a context that fits it, and for any prompt
in a longer context once the prompt passes it. With an original length below 256 llama.cpp never
runs the short factors: that export is refused.

Sliding windows (Mistral, Qwen 1) and Qwen 1's LogN scaling only change the computation past
a length; no llama.cpp builder of these families has them, so the file's context length is
that length: up to it, llama.cpp computes what our model does. llama.cpp's gemma2 does run
windows, in its own fixed alternation (even layers windowed, odd ones global, as Gemma 2
ships), and its own query scale and soft caps: a Gemma 2 model must match them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_lifecycle.models.checkpoint import SPECIAL_TOKENS
from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import longrope_scale
from llm_lifecycle.models.hf import chatml_template, check_exportable, fold_norm_head, permute_rotary, rotary_rows

ENDOFTEXT, IM_START, IM_END = SPECIAL_TOKENS
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")


@dataclass(frozen=True)
class Arch:
    name: str  # llama.cpp's architecture name
    interleaved: bool = False  # RoPE on interleaved pairs: our q/k rows permuted (see the module docstring)
    # knobs its builder computes beyond what the family's transformers layout holds (or only
    # changes past the file's context length); the rest is checked by hf.check_exportable
    holds: tuple[str, ...] = ()
    requires: dict[str, Any] = field(default_factory=dict)  # our fields the builder fixes
    mha_only: bool = False  # one [q; k; v] tensor of 3 x dim rows (Qwen 1)
    fused_qkv: bool = False  # one attn_qkv tensor: [q; k; v] rows (Qwen 1)
    fused_gate_up: bool = False  # ffn_up holds [gate; up] rows and there is no ffn_gate (ChatGLM, GLM-4, Phi-3)
    ffn_factor: int = 1  # Qwen 1: llama.cpp reads feed_forward_length as twice the gated width
    swa_pattern: int = 0  # llama.cpp windows every layer but each Nth one (Gemma 2: 2) and writes the window


_PAST_CONTEXT = ("sliding_window", "window_layers", "logn_train_len")
ARCHS = {
    "llama": Arch("llama", interleaved=True, holds=_PAST_CONTEXT[:2]),  # also Mistral and Mixtral
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3"),
    "qwen3moe": Arch("qwen3moe", requires={"norm_topk_prob": True}),
    "qwen2moe": Arch("qwen2moe", requires={"norm_topk_prob": False}),
    "gemma": Arch("gemma", requires={"tie_embeddings": True, "qkv_bias": False, "o_bias": False}),
    "gemma2": Arch("gemma2", requires={"tie_embeddings": True, "qkv_bias": False, "o_bias": False}, swa_pattern=2),
    "phi2": Arch("phi2"),
    "phi3": Arch("phi3", fused_gate_up=True),
    "qwen": Arch("qwen", holds=_PAST_CONTEXT, requires={"qkv_bias": True, "o_bias": False},
                 mha_only=True, fused_qkv=True, ffn_factor=2),
    "chatglm": Arch("chatglm", interleaved=True, holds=("rope_2d",), fused_gate_up=True),
    "glm4": Arch("glm4", interleaved=True, fused_gate_up=True),
    "internlm2": Arch("internlm2", interleaved=True, requires={"qkv_bias": False, "o_bias": False}),
    "baichuan": Arch("baichuan", interleaved=True, holds=("position",)),
    "refact": Arch("refact", holds=("position",)),
    # DeepSeek-V2 and V3: MLA written unabsorbed (attn_kv_b whole), which llama.cpp runs as plain attention;
    # expert groups ranked by their two best scores (V3's rule) with either router, V2's softmax too; V2's
    # own rule (a group's best expert) it cannot run, so gguf_arch refuses it
    "deepseek2": Arch("deepseek2", interleaved=True, holds=("n_expert_groups", "topk_groups")),
}
FAMILY_ARCHS = {
    "llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "gemma": "gemma", "gemma2": "gemma2", "phi": "phi2", "phi3": "phi3", "qwen": "qwen", "chatglm": "chatglm",
    "internlm2": "internlm2", "internlm3": "llama", "glm": "chatglm", "glm4": "glm4", "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2",
}
BAICHUAN_DEPTH = {"rope": (32, "llama"), "alibi": (40, "refact")}  # llama.cpp's depth, else the stand-in

# Our tensor names (inside "layers.{i}.") -> llama.cpp's (inside "blk.{i}.").
_LAYER = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_norm.bias": "attn_norm.bias",
    "attn.wq.weight": "attn_q.weight",
    "attn.wk.weight": "attn_k.weight",
    "attn.wv.weight": "attn_v.weight",
    "attn.wq.bias": "attn_q.bias",
    "attn.wk.bias": "attn_k.bias",
    "attn.wv.bias": "attn_v.bias",
    "attn.wqkv.weight": "attn_qkv.weight",  # fused by _fuse
    "attn.wqkv.bias": "attn_qkv.bias",
    "attn.wo.weight": "attn_output.weight",
    "attn.wo.bias": "attn_output.bias",
    "attn.q_norm.weight": "attn_q_norm.weight",
    "attn.k_norm.weight": "attn_k_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attn_post_norm.weight": "post_attention_norm.weight",  # post_norms
    "ffn_post_norm.weight": "post_ffw_norm.weight",
    "ffn.w_gate.weight": "ffn_gate.weight",
    "ffn.w_up.weight": "ffn_up.weight",
    "ffn.w_up.bias": "ffn_up.bias",
    "ffn.w_gate_up.weight": "ffn_up.weight",  # fused by _fuse
    "ffn.w_down.weight": "ffn_down.weight",
    "ffn.w_down.bias": "ffn_down.bias",
    "ffn.router.weight": "ffn_gate_inp.weight",
    "ffn.w_gate": "ffn_gate_exps.weight",  # stacked experts [E, out, in]
    "ffn.w_up": "ffn_up_exps.weight",
    "ffn.w_down": "ffn_down_exps.weight",
    "ffn.shared.w_gate.weight": "ffn_gate_shexp.weight",
    "ffn.shared.w_up.weight": "ffn_up_shexp.weight",
    "ffn.shared.w_down.weight": "ffn_down_shexp.weight",
    "ffn.shared_gate.weight": "ffn_gate_inp_shexp.weight",  # [1, dim] written as [dim]
    "ffn.score_bias": "exp_probs_b.bias",
    "attn.wq_a.weight": "attn_q_a.weight",  # multi-head latent attention
    "attn.q_a_norm.weight": "attn_q_a_norm.weight",
    "attn.wq_b.weight": "attn_q_b.weight",
    "attn.wkv_a.weight": "attn_kv_a_mqa.weight",
    "attn.kv_a_norm.weight": "attn_kv_a_norm.weight",
    "attn.wkv_b.weight": "attn_kv_b.weight",
}
_TOP = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "norm.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
    "lm_head.bias": "output.bias",
}
_KEEP_F32 = ("_norm.weight", ".bias", "ffn_gate_inp.weight")


def arch_name(cfg: ModelConfig) -> str:
    if cfg.family == "baichuan":
        depth, stand_in = BAICHUAN_DEPTH[cfg.position]
        return "baichuan" if cfg.n_layers == depth else stand_in
    if cfg.family not in FAMILY_ARCHS:
        families = ", ".join([*FAMILY_ARCHS, "baichuan"])
        raise ValueError(f"family '{cfg.family}' has no llama.cpp architecture here; GGUF export supports {families}")
    return FAMILY_ARCHS[cfg.family]


def gguf_arch(cfg: ModelConfig) -> Arch:
    """The llama.cpp architecture that runs `cfg`, after checking it holds every design choice."""
    arch = ARCHS[arch_name(cfg)]
    # llama.cpp's builders compute what the family's transformers class computes, plus `holds`:
    # a design choice outside both, llama.cpp cannot run either.
    defaults = ModelConfig()
    check_exportable(dataclasses.replace(cfg, **{k: getattr(defaults, k) for k in arch.holds}))
    for key, value in arch.requires.items():
        if getattr(cfg, key) != value:
            raise ValueError(f"llama.cpp's {arch.name} architecture needs {key}={value!r}")
    if arch.mha_only and cfg.n_kv_heads != cfg.n_heads:
        raise ValueError(f"llama.cpp's {arch.name} architecture needs multi-head attention (n_kv_heads = n_heads)")
    if arch.name == "deepseek2" and not cfg.n_shared_experts:
        raise ValueError("llama.cpp's deepseek2 architecture needs shared experts (n_shared_experts > 0)")
    yarn = cfg.rope_scaling if cfg.rope_scaling and cfg.rope_scaling["type"] == "yarn" else {}
    if arch.name == "deepseek2" and yarn and yarn.get("mscale", 0) != yarn.get("mscale_all_dim"):
        # measured with llama.cpp 0.3.36: plain YaRN 13-16% of the largest logit off, unequal mscales 1-16%
        raise ValueError("llama.cpp's deepseek2 runs YaRN as DeepSeek's with mscale = mscale_all_dim (cos/sin "
                         "unscaled, every score sharpened); this model's rope_scaling has no GGUF form: export it to "
                         "transformers (format hf) or ours")
    if cfg.n_expert_groups > 1 and cfg.expert_group_score != "top2_sum":
        # llama.cpp's build_moe_ffn always sums each group's two best scores; no GGUF key says otherwise
        raise ValueError(f"llama.cpp ranks expert groups by their two best experts (expert_group_score top2_sum); this "
                         f"model's {cfg.expert_group_score!r} (DeepSeek-V2's group_limited_greedy) has no GGUF form: "
                         "export it to transformers (format hf) or ours")
    if arch.name == "gemma2":
        _check_gemma2(cfg, arch)
    if is_longrope(cfg):
        _check_longrope(cfg)
    return arch


def is_longrope(cfg: ModelConfig) -> bool:
    return bool(cfg.rope_scaling) and cfg.rope_scaling["type"] == "longrope"


LLAMA_CPP_CONTEXT_STEP = 256  # llama.cpp rounds every context up to a multiple of this


def _check_longrope(cfg: ModelConfig) -> None:
    """llama.cpp runs LongRoPE's short factors only in a context of at most the original length
    (see the module docstring); below its smallest context they could never run."""
    scaling = cfg.rope_scaling
    if scaling["original_max_seq_len"] < LLAMA_CPP_CONTEXT_STEP and scaling["short_factor"] != scaling["long_factor"]:
        raise ValueError(f"llama.cpp uses LongRoPE's short factors only in a context of at most original_max_seq_len "
                         f"tokens and its contexts are multiples of {LLAMA_CPP_CONTEXT_STEP}: with "
                         f"original_max_seq_len={scaling['original_max_seq_len']} it would never compute them "
                         f"(extend from a model trained on {LLAMA_CPP_CONTEXT_STEP} tokens or more)")


def _check_gemma2(cfg: ModelConfig, arch: Arch) -> None:
    """llama.cpp's gemma2 always soft-caps, windows the layers in its own alternation and fixes
    the query scale by depth (46 layers, Gemma 2 27B: dim / n_heads; else head_dim)."""
    if not (cfg.attn_logit_softcap and cfg.final_logit_softcap):
        raise ValueError("llama.cpp's gemma2 architecture always soft-caps: it needs attn_logit_softcap and "
                         "final_logit_softcap")
    scalar = cfg.dim // cfg.n_heads if cfg.n_layers == 46 else cfg.head_dim
    if (cfg.query_pre_attn_scalar or cfg.head_dim) != scalar:
        raise ValueError(f"llama.cpp's gemma2 architecture scales queries by {scalar}^-0.5 at {cfg.n_layers} layers: "
                         f"it needs query_pre_attn_scalar={scalar}")
    window = swa_window(cfg, arch)
    if cfg.layer_windows() != [window if i % arch.swa_pattern < arch.swa_pattern - 1 else None
                               for i in range(cfg.n_layers)]:
        raise ValueError("llama.cpp's gemma2 architecture windows the even layers (all with one size) and "
                         f"not the odd ones; sliding_window is {cfg.layer_windows()}")


def swa_window(cfg: ModelConfig, arch: Arch) -> int | None:
    """The window llama.cpp applies to its windowed layers (a model without windows: the whole
    context, which windows nothing)."""
    if not arch.swa_pattern:
        return None
    return next((w for w in cfg.layer_windows() if w is not None), cfg.max_seq_len)


def exact_context(cfg: ModelConfig, arch: Arch) -> int:
    """The longest context on which llama.cpp computes what we do (see the module docstring)."""
    windows = [] if arch.swa_pattern else [w for w in cfg.layer_windows() if w is not None]
    limits = windows + [cfg.logn_train_len or cfg.max_seq_len]
    return min([cfg.max_seq_len, *limits])


def rope_rows(cfg: ModelConfig) -> int:
    """How many dims of each head llama.cpp rotates (GLM's 2D positions: plain text has span
    position 0, so only the first half of our rotary dims turns)."""
    return cfg.rotary_dim // 2 if cfg.rope_2d else cfg.rotary_dim


def _fuse(cfg: ModelConfig, arch: Arch, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our separate projections concatenated where the architecture keeps one tensor."""
    groups = {}
    if arch.fused_qkv:
        groups.update({f"attn.wqkv.{kind}": [f"attn.w{p}.{kind}" for p in "qkv"] for kind in ("weight", "bias")})
    if arch.fused_gate_up:
        groups["ffn.w_gate_up.weight"] = ["ffn.w_gate.weight", "ffn.w_up.weight"]
    for layer in range(cfg.n_layers):
        for fused, parts in groups.items():
            state[f"layers.{layer}.{fused}"] = torch.cat([state.pop(f"layers.{layer}.{p}") for p in parts])
    return state


def gguf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names -> float32 tensors, in our state dict's order."""
    arch = gguf_arch(cfg)
    state = {k: v.detach().float().cpu() for k, v in fold_norm_head(cfg, state).items()}
    if arch.interleaved and cfg.rotary_dim:
        for name, (heads, start) in rotary_rows(cfg).items():
            if name in state:
                state[name] = permute_rotary(state[name], heads, start, rope_rows(cfg), to_hf=True)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in _fuse(cfg, arch, state).items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp uses token_embd when there is no output tensor
        if name in _TOP:
            out[_TOP[name]] = tensor
            continue
        layer, _, rest = name.removeprefix("layers.").partition(".")
        if not name.startswith("layers.") or rest not in _LAYER:
            raise ValueError(f"tensor {name!r} has no GGUF counterpart for architecture {arch.name}")
        out[f"blk.{layer}.{_LAYER[rest]}"] = tensor.flatten() if rest == "ffn.shared_gate.weight" else tensor
    if is_longrope(cfg):  # one list per kind, shared by every layer
        for kind in ("long", "short"):
            out[f"rope_factors_{kind}.weight"] = torch.tensor(cfg.rope_scaling[f"{kind}_factor"], dtype=torch.float32)
    return out

def _tensor_type(name: str, tensor: torch.Tensor, ggml_type: str):
    """(GGMLQuantizationType, data as numpy) for one tensor."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if tensor.ndim == 1 or name.endswith(_KEEP_F32) or ggml_type == "f32":
        return T.F32, tensor.numpy()
    if ggml_type == "q4_0" and name in ("token_embd.weight", "output.weight"):
        ggml_type = "q8_0"  # as llama-quantize does, the embedding and head keep more bits
    qtype = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[ggml_type]
    block = 1 if qtype == T.F16 else 32
    if tensor.shape[-1] % block:
        return T.F16, tensor.numpy().astype(np.float16)
    data = tensor.numpy()
    return qtype, data.astype(np.float16) if qtype == T.F16 else quants.quantize(data, qtype)


# ---- tokenizer -------------------------------------------------------------------------------


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the way our tokenizer splits text before BPE."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex", True)) for s in steps]
    if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "refact"  # digits one by one, then GPT-2's regex: llama.cpp's "refact" splitter
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    raise ValueError(f"llama.cpp has no pre-tokenizer known to match {kinds}; GGUF export supports our byte-level BPE")


def _write_tokenizer(writer, tokenizer, system_prompt: str | None) -> None:
    from gguf import TokenType

    data = json.loads(tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise ValueError(f"GGUF export needs a byte-level BPE tokenizer, got {data['model']['type']}")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError("the tokenizer's ids are not contiguous; GGUF needs one token per id")
    # Special added tokens are control tokens; the others (the chat markup, <think> ...) are
    # user-defined: llama.cpp, like `tokenizers`, then matches them whole in text and prints them.
    added = {t["content"]: bool(t.get("special")) for t in data.get("added_tokens", [])}
    ids = {t: vocab.get(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"the tokenizer lacks the special token(s) {', '.join(missing)}")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(data))
    writer.add_token_list([t for t, _ in by_id])
    kinds = {True: TokenType.CONTROL, False: TokenType.USER_DEFINED}
    writer.add_token_types([kinds[added[t]] if t in added else TokenType.NORMAL for t, _ in by_id])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    writer.add_bos_token_id(ids[ENDOFTEXT])
    writer.add_add_bos_token(False)  # our models are trained without a BOS token
    writer.add_eos_token_id(ids[IM_END])  # a chat turn ends here; llama.cpp also stops at <|endoftext|>
    writer.add_pad_token_id(ids[ENDOFTEXT])
    writer.add_chat_template(chatml_template(system_prompt))


# ---- the file --------------------------------------------------------------------------------


def _write_hparams(writer, cfg: ModelConfig, arch: Arch, ggml_type: str) -> None:
    from gguf import LlamaFileType, RopeScalingType

    writer.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                          "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}[ggml_type])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(exact_context(cfg, arch))
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    # MoE layers only (no dense ones): llama.cpp's llama sizes its experts by this length
    ffn = cfg.moe_ffn_dim if cfg.is_moe and not cfg.n_dense_layers else cfg.ffn_dim
    writer.add_feed_forward_length(ffn * arch.ffn_factor)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.v_head_dim if cfg.is_mla else cfg.head_dim)
    if cfg.norm == "layernorm":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.is_moe:
        writer.add_expert_count(cfg.n_experts)
        writer.add_expert_used_count(cfg.n_experts_per_token)
        writer.add_expert_feed_forward_length(cfg.moe_ffn_dim)
        writer.add_expert_shared_feed_forward_length(cfg.n_shared_experts * cfg.moe_ffn_dim)
    if arch.name == "deepseek2":
        _write_deepseek_hparams(writer, cfg)
    if arch.swa_pattern:
        writer.add_sliding_window(swa_window(cfg, arch))
    if arch.name == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcap)
        writer.add_final_logit_softcapping(cfg.final_logit_softcap)
    if cfg.position != "rope":
        return  # ALiBi: no rotation (llama.cpp's refact and 40-layer baichuan builders add the bias)
    writer.add_rope_dimension_count(rope_rows(cfg))
    scaling, theta = cfg.rope_scaling, cfg.rope_theta
    if scaling and scaling["type"] == "ntk":  # static NTK-aware scaling is a larger base (as in hf.py)
        theta = cfg.rope_theta * float(scaling["factor"]) ** (cfg.head_dim / (cfg.head_dim - 2))
    elif scaling and scaling["type"] in ("linear", "yarn"):
        writer.add_rope_scaling_type(RopeScalingType.LINEAR if scaling["type"] == "linear" else RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        if scaling["type"] == "yarn":
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_seq_len"]))
        if "mscale_all_dim" in scaling:  # DeepSeek's: every score times (1 + log_mul ln(factor))^2
            writer.add_rope_scaling_yarn_log_mul(0.1 * float(scaling["mscale_all_dim"]))
    elif is_longrope(cfg):  # the factor lists are tensors (gguf_tensors); the cos/sin scale as ours computes it
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_seq_len"]))
        writer.add_rope_scaling_attn_factors(longrope_scale(scaling))
    elif scaling:
        raise ValueError(f"RoPE scaling {scaling['type']!r} is not exported to GGUF; supported: linear, ntk, yarn, "
                         "longrope (Phi-3)")
    writer.add_rope_freq_base(theta)


def _write_deepseek_hparams(writer, cfg: ModelConfig) -> None:
    """MLA ranks, dense first layers, shared experts and the router (V2: softmax, V3: sigmoid with groups)."""
    from gguf import ExpertGatingFuncType

    writer.add_q_lora_rank(cfg.q_lora_rank)
    writer.add_kv_lora_rank(cfg.kv_lora_rank)
    writer.add_leading_dense_block_count(cfg.n_dense_layers)
    writer.add_expert_shared_count(cfg.n_shared_experts)
    writer.add_expert_gating_func(ExpertGatingFuncType[cfg.router_score.upper()])
    writer.add_expert_weights_norm(cfg.norm_topk_prob)
    writer.add_expert_weights_scale(cfg.routed_scale)
    if cfg.n_expert_groups > 1:
        writer.add_expert_group_count(cfg.n_expert_groups)
        writer.add_expert_group_used_count(cfg.topk_groups)


def write_gguf(path: str | Path, cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer,
               ggml_type: str = "f16", name: str = "model", system_prompt: str | None = None) -> Path:
    """Write one GGUF file (atomically: beside `path`, then renamed); its chat template opens
    with `system_prompt` when a conversation brings no system turn."""
    import gguf

    if ggml_type not in GGUF_TYPES:
        raise ValueError(f"GGUF type '{ggml_type}' is not one of {', '.join(GGUF_TYPES)}")
    cfg.validate()
    arch = gguf_arch(cfg)
    tensors = gguf_tensors(cfg, state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch.name)
    try:
        writer.add_name(name)
        _write_hparams(writer, cfg, arch, ggml_type)
        _write_tokenizer(writer, tokenizer, system_prompt)
        for tensor_name, tensor in tensors.items():
            qtype, data = _tensor_type(tensor_name, tensor, ggml_type)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ollama_modelfile(gguf_name: str, system_prompt: str | None = None) -> str:
    """An Ollama Modelfile for a GGUF file in the same folder: ChatML turns, stop at the turn's
    end, and the model's fine-tuning system prompt as Ollama's default SYSTEM message."""
    system = f'SYSTEM """{system_prompt}"""\n' if system_prompt else ""
    return (
        f"FROM ./{gguf_name}\n"
        f"{system}"
        'TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        '<|im_start|>assistant\n"""\n'
        f'PARAMETER stop "{IM_END}"\n'
        f'PARAMETER stop "{ENDOFTEXT}"\n'
    )
