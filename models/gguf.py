"""GGUF export for llama.cpp and Ollama, written with the `gguf` package.

One file holds the weights (F32, F16, Q8_0 or Q4_0), the hyperparameters under the llama.cpp
architecture's keys, the tokenizer (byte-level BPE: tokens, types, merges, the pre-tokenizer
llama.cpp must split text with) and the ChatML chat template. An Ollama Modelfile is written
beside it.

Two layout facts carry over from llama.cpp's own converter (convert_hf_to_gguf.py):
- llama.cpp's "llama" architecture rotates interleaved pairs (x0, x1), (x2, x3), ... with
  RoPE while we (and Hugging Face) rotate the two halves of each head; permuting the rows of
  the q and k projections head by head makes the two the same. The qwen architectures use
  the half-rotation (NeoX) form and need no permutation.
- Quantized GGUF types work on blocks of 32 along a row: a tensor whose rows are not a whole
  number of blocks is written as F16; norms, biases and the MoE router stay F32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llm_lifecycle.models.checkpoint import SPECIAL_TOKENS
from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.hf import CHATML_TEMPLATE, check_exportable

ENDOFTEXT, IM_START, IM_END = SPECIAL_TOKENS
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")


@dataclass(frozen=True)
class Arch:
    name: str  # llama.cpp's architecture name
    permute_qk: bool  # see the module docstring


ARCHS = {
    "llama": Arch("llama", permute_qk=True),
    "qwen2": Arch("qwen2", permute_qk=False),
    "qwen3": Arch("qwen3", permute_qk=False),
    "qwen3_moe": Arch("qwen3moe", permute_qk=False),
}

# Our tensor names (inside "layers.{i}.") -> llama.cpp's (inside "blk.{i}.").
_LAYER = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.wq.weight": "attn_q.weight",
    "attn.wk.weight": "attn_k.weight",
    "attn.wv.weight": "attn_v.weight",
    "attn.wq.bias": "attn_q.bias",
    "attn.wk.bias": "attn_k.bias",
    "attn.wv.bias": "attn_v.bias",
    "attn.wo.weight": "attn_output.weight",
    "attn.q_norm.weight": "attn_q_norm.weight",
    "attn.k_norm.weight": "attn_k_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn.w_gate.weight": "ffn_gate.weight",
    "ffn.w_up.weight": "ffn_up.weight",
    "ffn.w_down.weight": "ffn_down.weight",
    "ffn.router.weight": "ffn_gate_inp.weight",
    "ffn.w_gate": "ffn_gate_exps.weight",  # stacked experts [E, out, in]
    "ffn.w_up": "ffn_up_exps.weight",
    "ffn.w_down": "ffn_down_exps.weight",
}
_TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_KEEP_F32 = ("_norm.weight", ".bias", "ffn_gate_inp.weight")


def gguf_arch(cfg: ModelConfig) -> Arch:
    if cfg.family not in ARCHS:
        raise ValueError(f"family '{cfg.family}' has no llama.cpp architecture here; GGUF export supports {', '.join(ARCHS)}")
    # llama.cpp's builders for these architectures are the transformers classes' computation:
    # a design choice the family's transformers layout cannot hold, llama.cpp cannot run either.
    check_exportable(cfg)
    if cfg.is_moe and not cfg.norm_topk_prob:
        raise ValueError("llama.cpp's qwen3moe always renormalises the top-k expert weights; norm_topk_prob must be true")
    return ARCHS[cfg.family]


def _permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head reordered from [first half, second half] to interleaved pairs."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names -> float32 tensors, in our state dict's order."""
    arch = gguf_arch(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp uses token_embd when there is no output tensor
        tensor = tensor.detach().float().cpu()
        if name in _TOP:
            out[_TOP[name]] = tensor
            continue
        layer, _, rest = name.removeprefix("layers.").partition(".")
        if not name.startswith("layers.") or rest not in _LAYER:
            raise ValueError(f"tensor {name!r} has no GGUF counterpart for architecture {arch.name}")
        if arch.permute_qk and rest.startswith(("attn.wq.", "attn.wk.")):
            tensor = _permute(tensor, cfg.n_heads if rest.startswith("attn.wq.") else cfg.n_kv_heads)
        out[f"blk.{layer}.{_LAYER[rest]}"] = tensor
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


def _write_tokenizer(writer, tokenizer) -> None:
    from gguf import TokenType

    data = json.loads(tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise ValueError(f"GGUF export needs a byte-level BPE tokenizer, got {data['model']['type']}")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError("the tokenizer's ids are not contiguous; GGUF needs one token per id")
    special = {t["content"] for t in data.get("added_tokens", []) if t.get("special")}
    ids = {t: vocab.get(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"the tokenizer lacks the special token(s) {', '.join(missing)}")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(data))
    writer.add_token_list([t for t, _ in by_id])
    writer.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t, _ in by_id])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    writer.add_bos_token_id(ids[ENDOFTEXT])
    writer.add_add_bos_token(False)  # our models are trained without a BOS token
    writer.add_eos_token_id(ids[IM_END])  # a chat turn ends here; llama.cpp also stops at <|endoftext|>
    writer.add_pad_token_id(ids[ENDOFTEXT])
    writer.add_chat_template(CHATML_TEMPLATE)


# ---- the file --------------------------------------------------------------------------------


def _write_hparams(writer, cfg: ModelConfig, ggml_type: str) -> None:
    from gguf import LlamaFileType, RopeScalingType

    writer.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                          "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}[ggml_type])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    scaling, theta = cfg.rope_scaling, cfg.rope_theta
    if scaling and scaling["type"] == "ntk":  # static NTK-aware scaling is a larger base (as in hf.py)
        theta = cfg.rope_theta * float(scaling["factor"]) ** (cfg.head_dim / (cfg.head_dim - 2))
    elif scaling and scaling["type"] in ("linear", "yarn"):
        writer.add_rope_scaling_type(RopeScalingType.LINEAR if scaling["type"] == "linear" else RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        if scaling["type"] == "yarn":
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_seq_len"]))
    elif scaling:
        raise ValueError(f"RoPE scaling {scaling['type']!r} is not exported to GGUF; supported: linear, ntk, yarn")
    writer.add_rope_freq_base(theta)
    if cfg.is_moe:
        writer.add_expert_count(cfg.n_experts)
        writer.add_expert_used_count(cfg.n_experts_per_token)
        writer.add_expert_feed_forward_length(cfg.moe_ffn_dim)


def write_gguf(path: str | Path, cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer,
               ggml_type: str = "f16", name: str = "model") -> Path:
    """Write one GGUF file (atomically: beside `path`, then renamed)."""
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
        _write_hparams(writer, cfg, ggml_type)
        _write_tokenizer(writer, tokenizer)
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


def ollama_modelfile(gguf_name: str) -> str:
    """An Ollama Modelfile for a GGUF file in the same folder: ChatML turns, stop at the turn's end."""
    return (
        f"FROM ./{gguf_name}\n"
        'TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        '<|im_start|>assistant\n"""\n'
        f'PARAMETER stop "{IM_END}"\n'
        f'PARAMETER stop "{ENDOFTEXT}"\n'
    )
