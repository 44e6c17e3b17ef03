"""Checkpoints that ship as remote code on the Hugging Face hub: Qwen 1, Baichuan 1/2,
ChatGLM2/3, InternLM2/2.5 and Phi-3-small. transformers has no class for them (their repos carry a
modeling_*.py that remote-code loading in transformers would run); we never run it. Each family here is
a config.json reader and a tensor mapping onto ours, written from the layouts those repos
publish: key names, fused tensors and their shapes, config keys.

What each layout fuses or orders differently from us:
- Qwen 1: `c_attn` is [q; k; v] with biases; the MLP computes w1(x) * silu(w2(x)), so w2 is
  our gate and w1 our up; `intermediate_size` is twice the gated width.
- Baichuan: `W_pack` is [q; k; v]. The 7B modeling file uses RoPE (its config has
  `max_position_embeddings`), the 13B one ALiBi (its config has only `model_max_length`).
  Baichuan 2 (its config has `z_loss_weight`) normalises the head's rows (NormHead).
- ChatGLM2/3: `query_key_value` is [q; k; v] with GQA sizes; `dense_h_to_4h` is [gate; up];
  RoPE on the first half of each head in interleaved pairs (permuted to our halves), base
  10000 x `rope_ratio`.
- InternLM2: `wqkv` is grouped per key/value head: [q heads of the group; k; v] for each group;
  w1/w3/w2 are gate/up/down.
- Phi-3-small: `query_key_value` grouped as InternLM2's, with biases; `up_proj` holds the
  GeGeLU's gate and linear halves interleaved (even rows gate, odd rows linear), with biases;
  LayerNorms with biases; tied embeddings; block sparsity and muP come from config keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.hf import permute_rotary

State = dict[str, torch.Tensor]


def _require(hf: dict[str, Any], what: str, **expected: Any) -> None:
    for key, value in expected.items():
        if hf.get(key, value) != value:
            raise ValueError(f"{what} checkpoints with {key}={hf[key]!r} are not supported (only {value!r})")


@dataclass(frozen=True)
class Layout:
    """How one remote-code family names and fuses its tensors."""

    layers: str  # the prefix before each layer's index
    top: dict[str, str]  # their name outside the layers -> ours
    names: dict[str, str]  # their name inside a layer -> ours
    qkv: str  # their fused q/k/v projection inside a layer (".weight", ".bias" follow)
    gate_up: str | None = None  # their fused [gate; up] projection inside a layer, if any (".weight", ".bias" follow)
    interleaved_gate_up: bool = False  # gate and up rows alternate (Phi-3-small), not [gate; up]
    grouped_qkv: bool = False  # [q heads of the group; k; v] per key/value group (InternLM2)
    interleaved_rope: bool = False  # RoPE on interleaved pairs (ChatGLM); ours rotates halves
    ignored: tuple[str, ...] = field(default=("inv_freq",))  # saved buffers we recompute (name endings)


def _split_qkv(cfg: ModelConfig, t: torch.Tensor, grouped: bool) -> tuple[torch.Tensor, ...]:
    """[q; k; v] rows, or InternLM2's grouped rows reordered to that, split into q, k, v."""
    if grouped:
        group, tail = cfg.n_heads // cfg.n_kv_heads, t.shape[1:]
        t = t.reshape(cfg.n_kv_heads, group + 2, cfg.head_dim, *tail)
        return tuple(x.reshape(-1, *tail) for x in (t[:, :group], t[:, group], t[:, group + 1]))
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return t.split([q, kv, kv])


def _layer(cfg: ModelConfig, layout: Layout, layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's tensors (their names inside the layer) as ours."""
    out = {ours: layer.pop(theirs) for theirs, ours in layout.names.items() if theirs in layer}
    for kind in ("weight", "bias"):
        if f"{layout.qkv}.{kind}" not in layer:
            continue
        q, k, v = _split_qkv(cfg, layer.pop(f"{layout.qkv}.{kind}"), layout.grouped_qkv)
        if layout.interleaved_rope:
            q = permute_rotary(q, cfg.n_heads, 0, cfg.rotary_dim, to_hf=False)
            k = permute_rotary(k, cfg.n_kv_heads, 0, cfg.rotary_dim, to_hf=False)
        out.update({f"attn.wq.{kind}": q, f"attn.wk.{kind}": k, f"attn.wv.{kind}": v})
    for kind in ("weight", "bias"):
        if layout.gate_up and f"{layout.gate_up}.{kind}" in layer:
            t = layer.pop(f"{layout.gate_up}.{kind}")
            out[f"ffn.w_gate.{kind}"], out[f"ffn.w_up.{kind}"] = (t[0::2], t[1::2]) if layout.interleaved_gate_up else t.chunk(2)
    if layer:
        raise ValueError(f"unexpected tensor {next(iter(layer))!r} in a {cfg.family} checkpoint layer")
    return out


def _convert(cfg: ModelConfig, layout: Layout, hf_state: State) -> State:
    """Our state dict from the family's tensors; a tensor the layout does not name is an error."""
    state, layers = {}, [{} for _ in range(cfg.n_layers)]
    for name, tensor in hf_state.items():
        if name in layout.top:
            state[layout.top[name]] = tensor
        elif name.endswith(layout.ignored):
            continue
        elif name.startswith(layout.layers):
            index, _, rest = name[len(layout.layers):].partition(".")
            layers[int(index)][rest] = tensor
        else:
            raise ValueError(f"unexpected tensor {name!r} in a {cfg.family} checkpoint")
    for i, layer in enumerate(layers):
        state.update({f"layers.{i}.{k}": v for k, v in _layer(cfg, layout, layer).items()})
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_embeddings.weight"]
    return {k: v.contiguous() for k, v in state.items()}


_NORMS = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"}


# ---- Qwen 1 (QWenLMHeadModel) ----------------------------------------------------------------


def _qwen_config(hf: dict[str, Any]) -> ModelConfig:
    heads = hf["num_attention_heads"]
    return ModelConfig(
        family="qwen", vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=heads, head_dim=hf.get("kv_channels", hf["hidden_size"] // heads),
        ffn_dim=hf["intermediate_size"] // 2, norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        rope_theta=float(hf.get("rotary_emb_base", 10000)), rotary_pct=hf.get("rotary_pct", 1.0),
        max_seq_len=hf.get("max_position_embeddings") or hf["seq_length"],
        logn_train_len=hf["seq_length"] if hf.get("use_logn_attn") else None,
        qkv_bias=True, o_bias=not hf.get("no_bias", True), tie_embeddings=hf.get("tie_word_embeddings", False),
    )


QWEN = Layout(
    layers="transformer.h.",
    top={"transformer.wte.weight": "tok_embeddings.weight", "transformer.ln_f.weight": "norm.weight",
         "lm_head.weight": "lm_head.weight"},
    names={
        "ln_1.weight": "attn_norm.weight", "ln_2.weight": "ffn_norm.weight",
        "attn.c_proj.weight": "attn.wo.weight", "attn.c_proj.bias": "attn.wo.bias",
        "mlp.w2.weight": "ffn.w_gate.weight", "mlp.w1.weight": "ffn.w_up.weight", "mlp.c_proj.weight": "ffn.w_down.weight",
    },
    qkv="attn.c_attn",
)


# ---- Baichuan 1 and 2 (BaichuanForCausalLM / BaiChuanForCausalLM) -----------------------------


def _baichuan_config(hf: dict[str, Any]) -> ModelConfig:
    _require(hf, "Baichuan", hidden_act="silu")
    heads = hf["num_attention_heads"]
    rope = "max_position_embeddings" in hf  # 7B (RoPE) configs carry it; 13B (ALiBi) ones do not
    return ModelConfig(
        family="baichuan", vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=heads, ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        position="rope" if rope else "alibi",
        max_seq_len=hf.get("max_position_embeddings") or hf["model_max_length"],
        norm_head="z_loss_weight" in hf,  # Baichuan 2
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


BAICHUAN = Layout(
    layers="model.layers.",
    top={"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
         "lm_head.weight": "lm_head.weight"},
    names={
        **_NORMS, "self_attn.o_proj.weight": "attn.wo.weight", "mlp.gate_proj.weight": "ffn.w_gate.weight",
        "mlp.up_proj.weight": "ffn.w_up.weight", "mlp.down_proj.weight": "ffn.w_down.weight",
    },
    qkv="self_attn.W_pack",
)


# ---- ChatGLM2/3 (ChatGLMForConditionalGeneration) ---------------------------------------------


def _chatglm_config(hf: dict[str, Any]) -> ModelConfig:
    if "position_encoding_2d" in hf or "inner_hidden_size" in hf:
        raise ValueError("ChatGLM-6B (version 1) checkpoints are not supported; ChatGLM2/3 are")
    _require(hf, "ChatGLM", rmsnorm=True, add_bias_linear=False, post_layer_norm=True, original_rope=True,
             apply_residual_connection_post_layernorm=False)
    heads = hf["num_attention_heads"]
    return ModelConfig(
        family="chatglm", vocab_size=hf["padded_vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_layers"],
        n_heads=heads, n_kv_heads=hf["multi_query_group_num"] if hf.get("multi_query_attention") else heads,
        head_dim=hf.get("kv_channels", hf["hidden_size"] // heads), ffn_dim=hf["ffn_hidden_size"],
        norm_eps=hf.get("layernorm_epsilon", 1e-5), rotary_pct=0.5, rope_theta=10000.0 * hf.get("rope_ratio", 1),
        max_seq_len=hf["seq_length"], qkv_bias=hf.get("add_qkv_bias", False),
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


CHATGLM = Layout(
    layers="transformer.encoder.layers.",
    top={"transformer.embedding.word_embeddings.weight": "tok_embeddings.weight",
         "transformer.encoder.final_layernorm.weight": "norm.weight", "transformer.output_layer.weight": "lm_head.weight"},
    names={**_NORMS, "self_attention.dense.weight": "attn.wo.weight", "mlp.dense_4h_to_h.weight": "ffn.w_down.weight"},
    qkv="self_attention.query_key_value",
    gate_up="mlp.dense_h_to_4h",
    interleaved_rope=True,
)


# ---- InternLM2 / 2.5 (InternLM2ForCausalLM) ---------------------------------------------------


def _internlm2_rope(hf: dict[str, Any]) -> dict[str, Any] | None:
    scaling = hf.get("rope_scaling")
    if not scaling:
        return None
    kind = scaling.get("type")
    if kind == "dynamic":  # InternLM2's dynamic NTK is ours: base grows past the original length
        return {"type": "dynamic", "factor": float(scaling["factor"]), "original_max_seq_len": hf["max_position_embeddings"]}
    if kind == "linear":
        return {"type": "linear", "factor": float(scaling["factor"])}
    raise ValueError(f"InternLM2 RoPE scaling {kind!r} is not supported; supported: dynamic, linear")


def _internlm2_config(hf: dict[str, Any]) -> ModelConfig:
    _require(hf, "InternLM2", hidden_act="silu")
    return ModelConfig(
        family="internlm2", vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta", 10000)), rope_scaling=_internlm2_rope(hf),
        max_seq_len=hf["max_position_embeddings"], qkv_bias=hf.get("bias", False), o_bias=hf.get("bias", False),
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


INTERNLM2 = Layout(
    layers="model.layers.",
    top={"model.tok_embeddings.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
         "output.weight": "lm_head.weight"},
    names={
        "attention_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
        "attention.wo.weight": "attn.wo.weight", "attention.wo.bias": "attn.wo.bias",
        "feed_forward.w1.weight": "ffn.w_gate.weight", "feed_forward.w3.weight": "ffn.w_up.weight",
        "feed_forward.w2.weight": "ffn.w_down.weight",
    },
    qkv="attention.wqkv",
    grouped_qkv=True,
)


# ---- Phi-3-small (Phi3SmallForCausalLM) ---------------------------------------------------------


def _phi3small_ffn(hf: dict[str, Any]) -> int:
    """ff_intermediate_size, or the config class's rule: ff_dim_multiplier * (width // 3) * 2,
    rounded up to a multiple of 256 with gegelu_pad_to_256."""
    if hf.get("ff_intermediate_size"):
        return hf["ff_intermediate_size"]
    size = hf.get("ff_dim_multiplier") or 4
    size = size * (hf["hidden_size"] // 3) * 2
    return -(-size // 256) * 256 if hf.get("gegelu_pad_to_256", True) else size


def _phi3small_rope(hf: dict[str, Any]) -> dict[str, Any] | None:
    """Phi-3-small-128k's LongRoPE ({type: su or longrope, short/long factors, short/long
    mscale, the original length inside or beside it}) as ours; the 8k model has none."""
    scaling = hf.get("rope_scaling")
    if not scaling:
        return None
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in ("su", "longrope"):
        raise ValueError(f"Phi-3-small RoPE scaling {kind!r} is not supported; supported: su / longrope (LongRoPE)")
    original = scaling.get("original_max_position_embeddings") or hf["original_max_position_embeddings"]
    ours = {"type": "longrope", "factor": max(1.0, hf["max_position_embeddings"] / original),
            "original_max_seq_len": original, "short_factor": scaling["short_factor"], "long_factor": scaling["long_factor"]}
    return ours | {k: float(scaling[k]) for k in ("short_mscale", "long_mscale") if scaling.get(k) is not None}


def _phi3small_config(hf: dict[str, Any]) -> ModelConfig:
    _require(hf, "Phi-3-small", hidden_act="gegelu", rope_position_scale=1.0)
    heads, dim = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = dim // heads
    # muP: scores times mup_attn_multiplier / head_dim, i.e. query_pre_attn_scalar^-0.5 with this scalar
    scalar = (head_dim / hf.get("mup_attn_multiplier", 1.0)) ** 2 if hf.get("mup_use_scaling", True) else None
    return ModelConfig(
        family="phi3small", vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads, norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gegelu", gegelu_limit=hf.get("gegelu_limit"),
        ffn_dim=_phi3small_ffn(hf), rope_theta=float(hf.get("rope_embedding_base", 1e6)), rope_scaling=_phi3small_rope(hf),
        max_seq_len=hf.get("max_position_embeddings", 8192), qkv_bias=True, o_bias=True, mlp_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        blocksparse_block_size=hf.get("blocksparse_block_size", 64),
        blocksparse_local_blocks=hf.get("blocksparse_num_local_blocks", 16),
        blocksparse_vert_stride=hf.get("blocksparse_vert_stride", 8),
        blocksparse_homo_heads=hf.get("blocksparse_homo_head_pattern", False),
        dense_attention_every_n_layers=hf.get("dense_attention_every_n_layers") or 0,
        query_pre_attn_scalar=scalar, embedding_multiplier=float(hf.get("mup_embedding_multiplier") or 1.0),
        logit_divisor=float(hf.get("mup_width_multiplier") or 1.0),
    )


PHI3SMALL = Layout(
    layers="model.layers.",
    top={"model.embed_tokens.weight": "tok_embeddings.weight", "model.final_layernorm.weight": "norm.weight",
         "model.final_layernorm.bias": "norm.bias", "lm_head.weight": "lm_head.weight"},
    names={
        **{f"input_layernorm.{k}": f"attn_norm.{k}" for k in ("weight", "bias")},
        **{f"post_attention_layernorm.{k}": f"ffn_norm.{k}" for k in ("weight", "bias")},
        **{f"self_attn.dense.{k}": f"attn.wo.{k}" for k in ("weight", "bias")},
        **{f"mlp.down_proj.{k}": f"ffn.w_down.{k}" for k in ("weight", "bias")},
    },
    qkv="self_attn.query_key_value",
    grouped_qkv=True,
    gate_up="mlp.up_proj",
    interleaved_gate_up=True,
)


# ---- public ------------------------------------------------------------------------------------

# model_type in config.json -> (config reader, tensor layout)
REMOTE_FAMILIES: dict[str, tuple[Callable[[dict[str, Any]], ModelConfig], Layout]] = {
    "qwen": (_qwen_config, QWEN),
    "baichuan": (_baichuan_config, BAICHUAN),
    "chatglm": (_chatglm_config, CHATGLM),
    "internlm2": (_internlm2_config, INTERNLM2),
    "phi3small": (_phi3small_config, PHI3SMALL),
}


def import_remote(hf: dict[str, Any], hf_state: State) -> tuple[ModelConfig, State]:
    """(ModelConfig, our state_dict) from a remote-code family's config.json and tensors."""
    read_config, layout = REMOTE_FAMILIES[hf["model_type"]]
    cfg = read_config(hf)
    cfg.validate()
    return cfg, _convert(cfg, layout, hf_state)
