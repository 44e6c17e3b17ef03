"""Hugging Face checkpoints: one table says how each transformers family maps onto ours.

A `Family` row names the transformers class, which config.json keys carry which of our
ModelConfig fields, what the architecture fixes (Qwen2 always has q/k/v biases), and how
its tensors are named (and fused or permuted) relative to ours. Export writes the layout
the published checkpoints use (config.json with `rope_theta`/`rope_scaling`, one tensor
per expert), which every transformers version reads; import takes that layout and
transformers 5's fused-expert layout. Nothing here runs remote code.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llm_lifecycle.models.atomic import atomic_dir
from llm_lifecycle.models.checkpoint import SPECIAL_TOKENS, TOKENIZER_FILE, grow_vocab, load_model_dir, read_config
from llm_lifecycle.models.config import YARN_MSCALES, ModelConfig

ENDOFTEXT, IM_START, IM_END = SPECIAL_TOKENS
# ChatML with Qwen's tool turns (workflows/data/chat_data.py renders the same text for training):
# an assistant's tool_calls follow its content as <tool_call> JSON lines, and a run of `tool`
# messages becomes one user turn of <tool_response> blocks. Thinking (<think>, /think) is plain
# text in the messages. `enable_thinking=False` opens the reply with Qwen3's empty think block.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user\\n' }}"
    "{% else %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set call = call['function'] if call['function'] is defined else call %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": ' + (call['name'] | tojson) + ', \"arguments\": ' }}"
    "{{ call['arguments'] if call['arguments'] is string else (call['arguments'] | tojson) }}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)



def chatml_template(default_system: str | None = None) -> str:
    """CHATML_TEMPLATE, with `default_system` as the system turn of a conversation that brings
    none: the prompt the model was fine-tuned with (config.json `system_prompt`), so a chat
    through transformers, llama.cpp or lm-eval reads what training read (Qwen2's template does
    the same with its own default)."""
    if default_system is None:
        return CHATML_TEMPLATE
    # JSON string escapes are Jinja string-literal escapes: quotes and newlines in the prompt stay text.
    return ("{% if not messages or messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n' + "
            + json.dumps(default_system, ensure_ascii=False) + " + '<|im_end|>\\n' }}{% endif %}" + CHATML_TEMPLATE)


# ---- the family table --------------------------------------------------------------------------

# config.json key -> our ModelConfig field, for every family (a family's own `config` overrides by key).
COMMON_CONFIG = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "head_dim": "head_dim",
    "intermediate_size": "ffn_dim",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
}
# Our parameter name inside layer i ("layers.{i}.") -> the HF name inside "model.layers.{i}.".
COMMON_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.wo.bias": "self_attn.o_proj.bias",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_norm.bias": "input_layernorm.bias",  # LayerNorm
    "ffn_norm.bias": "post_attention_layernorm.bias",
    "ffn.w_gate.weight": "mlp.gate_proj.weight",
    "ffn.w_up.weight": "mlp.up_proj.weight",
    "ffn.w_down.weight": "mlp.down_proj.weight",
    "ffn.router.weight": "mlp.gate.weight",
}
TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "norm.bias": "model.norm.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
}
# Our stacked expert weights [n_experts, out, in] -> the projection name in the family's per-expert template.
EXPERT_PROJS = {"ffn.w_gate": "gate_proj", "ffn.w_up": "up_proj", "ffn.w_down": "down_proj"}
# Fields that only matter for MoE layers, and training settings no config.json needs to carry.
MOE_FIELDS = (
    "n_experts_per_token", "moe_ffn_dim", "norm_topk_prob", "n_dense_layers",
    "router_score", "router_bias", "n_expert_groups", "topk_groups", "expert_group_score", "routed_scale",
)
TRAINING_ONLY = ("router_aux_loss_coef", "router_z_loss_coef", "max_z_loss_coef", "moe_balance", "router_bias_update",
                 "ffn_multiple_of")
SILU = {"hidden_act": "silu"}
# Other spellings of a config.json key that some transformers versions write (5.x: num_local_experts).
KEY_ALIASES = {"num_experts": "num_local_experts", "n_routed_experts": "num_local_experts"}
# What transformers assumes when a config.json leaves a key out (where that differs from our default).
HF_DEFAULTS = {"tie_word_embeddings": False}
ZERO_IS_NONE = ("q_lora_rank",)  # config.json says "none" with null where we say 0


@dataclass(frozen=True)
class TopkMethod:
    """What a DeepSeek layout's config.json `topk_method` says: `grouped`, the method that keeps
    each token to its topk_group best of n_group expert groups, ranked by our expert_group_score
    `group_score`; `plain`, the method that ignores groups (None: `grouped` with n_group 1)."""

    grouped: str
    group_score: str
    plain: str | None = None

    def for_config(self, cfg: ModelConfig) -> str:
        return self.plain if self.plain and cfg.n_expert_groups == 1 else self.grouped

    def fields(self, hf: dict[str, Any], architecture: str) -> dict[str, Any]:
        """Our routing fields for the checkpoint's topk_method (absent: the class default, `plain` first)."""
        method = hf.get("topk_method") or self.plain or self.grouped
        if method == self.grouped:
            return {"expert_group_score": self.group_score}
        if method == self.plain:  # the file's n_group/topk_group, if any, are unused
            return {"n_expert_groups": 1, "topk_groups": 1}
        accepted = " or ".join(repr(m) for m in (self.grouped, self.plain) if m)
        raise ValueError(f"{architecture} checkpoints with topk_method={method!r} are not supported (only {accepted})")


@dataclass(frozen=True)
class Family:
    """How one transformers architecture maps onto our ModelConfig and parameter names."""

    architecture: str
    # config.json key -> our field, beyond COMMON_CONFIG; a tuple of fields: one flag sets them all on import
    # and is on when any is on at export (the parameters of those that are off are written as zeros)
    config: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    implied: dict[str, Any] = field(default_factory=dict)  # our fields the architecture fixes
    # config.json values written on export and required on import (a tuple: the accepted spellings, first written)
    constants: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)  # the class's config defaults, beyond HF_DEFAULTS
    names: dict[str, str] = field(default_factory=dict)  # overrides of COMMON_NAMES
    top: dict[str, str] = field(default_factory=dict)  # overrides of TOP_NAMES
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # HF name in a layer -> our names, concatenated on dim 0
    experts: str = "mlp.experts.{e}.{proj}.weight"  # per-expert tensor names, inside a layer
    expert_projs: dict[str, str] = field(default_factory=lambda: dict(EXPERT_PROJS))
    moe: bool = False
    norm_offset: bool = False  # RMSNorm scales stored as w - 1 (Gemma computes x * (1 + w))
    rope_interleaved: bool = False  # rotary dims paired (0, 1), (2, 3), ... (GLM, DeepSeek) instead of halves
    # our rope_scaling types its config holds (_rope_to_hf); Phi-3 reads a yarn entry as LongRoPE
    # and is the one layout with LongRoPE's factor lists
    rope_scalings: tuple[str, ...] = ("ntk", "linear", "dynamic", "yarn", "llama3")
    shared_width: str | None = None  # config key of the shared experts' total width, n_shared_experts x moe_ffn_dim
    # per-layer windows as config.json's layer_types ("sliding_attention"/"full_attention") and
    # one sliding_window size (Gemma 2's alternating local and global layers)
    layer_types: bool = False
    topk_method: TopkMethod | None = None  # DeepSeek's group-limited routing, as config.json names it
    yarn_mscales: bool = False  # YaRN with DeepSeek's mscale/mscale_all_dim (its attention sharpens every dim)

    def config_keys(self) -> dict[str, str | tuple[str, ...]]:
        """config.json key -> our field(s) (one key per field; a family's own key wins)."""
        keys = {k: f for k, f in COMMON_CONFIG.items() if f not in self.config.values()}
        return {**keys, **self.config}

    def carried_fields(self) -> set[str]:
        fields = {f for v in self.config_keys().values() for f in (v if isinstance(v, tuple) else (v,))}
        return fields | ({"n_shared_experts"} if self.shared_width else set())

    def layer_names(self) -> dict[str, str]:
        return {**COMMON_NAMES, **self.names}

    def top_names(self) -> dict[str, str]:
        return {**TOP_NAMES, **self.top}


_MOE_CONFIG = {"num_experts_per_tok": "n_experts_per_token", "router_aux_loss_coef": "router_aux_loss_coef"}
_ATTENTION_BIAS = {"attention_bias": ("qkv_bias", "o_bias")}  # one flag for q, k, v and o biases

# DeepSeek's multi-head latent attention, shared experts and dense first layers (V2 and V3).
_DEEPSEEK_CONFIG = {
    "qk_head_dim": "head_dim", "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim",
    "n_routed_experts": "n_experts", "moe_intermediate_size": "moe_ffn_dim", "n_shared_experts": "n_shared_experts",
    "first_k_dense_replace": "n_dense_layers", "routed_scaling_factor": "routed_scale",
    "num_experts_per_tok": "n_experts_per_token", "n_group": "n_expert_groups", "topk_group": "topk_groups",
}
_MLA_NAMES = {
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "ffn.shared.w_gate.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared.w_up.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared.w_down.weight": "mlp.shared_experts.down_proj.weight",
}

HF_FAMILIES: dict[str, Family] = {
    "llama": Family(
        "LlamaForCausalLM", config=_ATTENTION_BIAS,
        constants={**SILU, "mlp_bias": False, "pretraining_tp": 1},
    ),
    "qwen2": Family("Qwen2ForCausalLM", implied={"qkv_bias": True}, constants={**SILU, "use_sliding_window": False}),
    "qwen3": Family(
        "Qwen3ForCausalLM", config=_ATTENTION_BIAS, implied={"qk_norm": True},
        constants={**SILU, "use_sliding_window": False},
    ),
    "qwen3_moe": Family(
        "Qwen3MoeForCausalLM",
        config={
            **_ATTENTION_BIAS, "num_experts": "n_experts", "moe_intermediate_size": "moe_ffn_dim",
            "norm_topk_prob": "norm_topk_prob", **_MOE_CONFIG,
        },
        implied={"qk_norm": True},
        constants={**SILU, "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False},
        moe=True,
    ),
    "mistral": Family("MistralForCausalLM", config={"sliding_window": "sliding_window"}, constants=SILU),
    # Mixtral renormalises its top-k softmax probabilities, i.e. norm_topk_prob.
    "mixtral": Family(
        "MixtralForCausalLM",
        config={
            "num_local_experts": "n_experts", "intermediate_size": "moe_ffn_dim", "sliding_window": "sliding_window",
            **_MOE_CONFIG,
        },
        implied={"norm_topk_prob": True},
        constants={**SILU, "router_jitter_noise": 0.0},
        names={"ffn.router.weight": "block_sparse_moe.gate.weight"},
        experts="block_sparse_moe.experts.{e}.{proj}.weight",
        expert_projs={"ffn.w_gate": "w1", "ffn.w_up": "w3", "ffn.w_down": "w2"},
        moe=True,
    ),
    "gemma": Family(
        "GemmaForCausalLM", config=_ATTENTION_BIAS,
        implied={"mlp": "geglu", "scale_embeddings": True},
        constants={"hidden_act": ("gelu_pytorch_tanh", "gelu")},  # "gelu" in old configs meant the tanh form
        defaults={"tie_word_embeddings": True}, norm_offset=True,
    ),
    "phi": Family(
        "PhiForCausalLM",
        config={"layer_norm_eps": "norm_eps", "partial_rotary_factor": "rotary_pct"},
        implied={
            "norm": "layernorm", "mlp": "gelu", "parallel_block": True,
            "qkv_bias": True, "o_bias": True, "mlp_bias": True, "head_bias": True,
        },
        constants={"hidden_act": "gelu_new", "qk_layernorm": False},
        defaults={"partial_rotary_factor": 0.5},
        names={
            "attn.wo.weight": "self_attn.dense.weight", "attn.wo.bias": "self_attn.dense.bias",
            "ffn.w_up.weight": "mlp.fc1.weight", "ffn.w_up.bias": "mlp.fc1.bias",
            "ffn.w_down.weight": "mlp.fc2.weight", "ffn.w_down.bias": "mlp.fc2.bias",
        },
        top={"norm.weight": "model.final_layernorm.weight", "norm.bias": "model.final_layernorm.bias"},
    ),
    # DeepSeek-V2: MLA, softmax routing without renormalisation, shared experts, dense first
    # layers; top-k over all experts (greedy) or within the best groups, each ranked by its best
    # expert (group_limited_greedy, the released 236B's).
    "deepseek_v2": Family(
        "DeepseekV2ForCausalLM",
        config=_DEEPSEEK_CONFIG,
        implied={"norm_topk_prob": False},  # transformers' V2 router never renormalises
        constants={**SILU, "attention_bias": False, "mlp_bias": False},
        names=_MLA_NAMES, moe=True, rope_interleaved=True, yarn_mscales=True,
        topk_method=TopkMethod("group_limited_greedy", "max", plain="greedy"),
    ),
    # DeepSeek-V3: adds sigmoid routing with a balancing bias and group-limited top-k. Its
    # multi-token-prediction layers are not imported.
    "deepseek_v3": Family(
        "DeepseekV3ForCausalLM",
        config={
            **_DEEPSEEK_CONFIG, "norm_topk_prob": "norm_topk_prob",
        },
        implied={"router_score": "sigmoid", "router_bias": True},
        constants={
            **SILU, "attention_bias": False, "rope_interleave": True,
            "scoring_func": "sigmoid", "moe_layer_freq": 1,
        },
        names={**_MLA_NAMES, "ffn.score_bias": "mlp.gate.e_score_correction_bias"},
        moe=True, rope_interleaved=True, yarn_mscales=True,
        topk_method=TopkMethod("noaux_tc", "top2_sum"),  # groups ranked by their two best experts
    ),
    # Qwen2-MoE: Qwen3-MoE's routing without q/k-norm, plus a shared expert behind a per-token sigmoid gate
    "qwen2_moe": Family(
        "Qwen2MoeForCausalLM",
        config={
            "qkv_bias": "qkv_bias", "num_experts": "n_experts", "moe_intermediate_size": "moe_ffn_dim",
            "norm_topk_prob": "norm_topk_prob", **_MOE_CONFIG,
        },
        implied={"shared_expert_gate": True},
        constants={**SILU, "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False},
        defaults={"qkv_bias": True, "norm_topk_prob": False},
        names={
            "ffn.shared.w_gate.weight": "mlp.shared_expert.gate_proj.weight",
            "ffn.shared.w_up.weight": "mlp.shared_expert.up_proj.weight",
            "ffn.shared.w_down.weight": "mlp.shared_expert.down_proj.weight",
            "ffn.shared_gate.weight": "mlp.shared_expert_gate.weight",
        },
        moe=True, shared_width="shared_expert_intermediate_size",
    ),
    # GLM-4-0414: Glm plus a norm on each branch's output ("sandwich" norms)
    "glm4": Family(
        "Glm4ForCausalLM",
        config={"attention_bias": "qkv_bias", "partial_rotary_factor": "rotary_pct"},
        implied={"post_norms": True},
        constants=SILU,
        defaults={"partial_rotary_factor": 0.5, "attention_bias": True},
        names={"attn_post_norm.weight": "post_self_attn_layernorm.weight", "ffn_post_norm.weight": "post_mlp_layernorm.weight"},
        fused={"mlp.gate_up_proj.weight": ("ffn.w_gate.weight", "ffn.w_up.weight")},
        rope_interleaved=True,
    ),
    # Gemma 2: Gemma's GeGLU, (1 + w) norms and scaled embeddings, plus a norm after each branch,
    # local (sliding-window) and global layers alternating, its own query scale, and tanh soft
    # caps on the attention scores and the output logits.
    "gemma2": Family(
        "Gemma2ForCausalLM",
        config={
            **_ATTENTION_BIAS, "query_pre_attn_scalar": "query_pre_attn_scalar",
            "attn_logit_softcapping": "attn_logit_softcap", "final_logit_softcapping": "final_logit_softcap",
        },
        implied={"mlp": "geglu", "scale_embeddings": True, "post_norms": True},
        constants={"hidden_activation": "gelu_pytorch_tanh"},
        defaults={"tie_word_embeddings": True, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                  "final_logit_softcapping": 30.0},
        names={
            "attn_post_norm.weight": "post_attention_layernorm.weight",
            "ffn_norm.weight": "pre_feedforward_layernorm.weight",
            "ffn_post_norm.weight": "post_feedforward_layernorm.weight",
        },
        norm_offset=True, layer_types=True,
    ),
    # InternLM3: the Llama computation (transformers runs it as Llama), GQA 16:1, no biases
    # (the published config.json spells them qkv_bias and bias; transformers attention_bias, mlp_bias).
    "internlm3": Family(
        "InternLM3ForCausalLM",
        constants={**SILU, "qkv_bias": False, "bias": False, "attention_bias": False, "mlp_bias": False},
    ),
    # Phi-3: the Llama computation with q/k/v and gate/up fused (GQA: unequal parts).
    "phi3": Family(
        "Phi3ForCausalLM",
        config={"sliding_window": "sliding_window", "partial_rotary_factor": "rotary_pct"},
        constants=SILU,
        rope_scalings=("ntk", "longrope"),
        defaults={"partial_rotary_factor": 1.0},
        fused={
            "self_attn.qkv_proj.weight": ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight"),
            "mlp.gate_up_proj.weight": ("ffn.w_gate.weight", "ffn.w_up.weight"),
        },
    ),
    "glm": Family(
        "GlmForCausalLM",
        config={"attention_bias": "qkv_bias", "partial_rotary_factor": "rotary_pct"},
        constants=SILU,
        defaults={"partial_rotary_factor": 0.5, "attention_bias": True},
        fused={"mlp.gate_up_proj.weight": ("ffn.w_gate.weight", "ffn.w_up.weight")},
        rope_interleaved=True,
    ),
}


# Our families that export through another's layout when the model uses none of the knobs
# that layout lacks: Baichuan 2 (7B, RoPE) is the Llama layout plus NormHead, which export
# folds into the output weights; Qwen 1 without LogN or windows is Llama with q/k/v biases;
# InternLM2 is Llama with its tensors fused; ChatGLM2/3 without GLM-130B's 2D positions is
# transformers' Glm (GLM-4 kept ChatGLM3's architecture).
EXPORTS_AS = {"baichuan": "llama", "qwen": "llama", "internlm2": "llama", "chatglm": "glm"}
FOLDED = ("norm_head",)  # knobs export bakes into the weights


def fold_norm_head(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Baichuan 2's NormHead baked in: the head's rows at unit norm, as the model uses them."""
    if cfg.norm_head:
        state = {**state, "lm_head.weight": torch.nn.functional.normalize(state["lm_head.weight"], dim=-1)}
    return state


def hf_model_type(cfg: ModelConfig) -> str:
    model_type = EXPORTS_AS.get(cfg.family, cfg.family)
    if model_type not in HF_FAMILIES:
        raise ValueError(
            f"family '{cfg.family}' has no transformers layout; families that export: "
            f"{', '.join([*HF_FAMILIES, *EXPORTS_AS])}"
        )
    return model_type


def family_of(cfg: ModelConfig) -> Family:
    return HF_FAMILIES[hf_model_type(cfg)]


def _unused_fields(cfg: ModelConfig) -> set[str]:
    """Fields whose value does not change this model's computation."""
    if not cfg.is_moe:
        return set(MOE_FIELDS)
    unused = set() if cfg.n_dense_layers else {"ffn_dim"}  # dense layers use ffn_dim
    return unused | ({"expert_group_score"} if cfg.n_expert_groups == 1 else set())


def check_exportable(cfg: ModelConfig) -> Family:
    """The family's row, after checking that its layout holds every design choice of `cfg`."""
    family = family_of(cfg)
    if family.moe != cfg.is_moe:
        need = "n_experts > 0" if family.moe else "n_experts = 0 (dense)"
        raise ValueError(f"family '{cfg.family}' exports as {family.architecture}, which needs {need}")
    if family.layer_types:
        if len({w for w in cfg.layer_windows() if w is not None}) > 1:
            raise ValueError(f"family '{cfg.family}' exports as {family.architecture}, whose windowed layers share one size")
    elif isinstance(cfg.sliding_window, list):
        raise ValueError(f"family '{cfg.family}' exports as {family.architecture}, which has one sliding_window for all layers")
    if cfg.rope_scaling and cfg.rope_scaling["type"] not in family.rope_scalings:
        raise ValueError(f"family '{cfg.family}' exports as {family.architecture}, which cannot hold "
                         f"rope_scaling type {cfg.rope_scaling['type']!r} (it holds: {', '.join(family.rope_scalings)})")
    mscales = sorted({"short_mscale", "long_mscale"} & set(cfg.rope_scaling or {}))
    if mscales:  # transformers' and llama.cpp's LongRoPE derive one cos/sin scale from the factor
        raise ValueError(f"family '{cfg.family}' exports as {family.architecture}, whose LongRoPE cannot hold "
                         f"rope_scaling {' and '.join(mscales)}")
    topk = family.topk_method
    if topk and cfg.n_expert_groups > 1 and cfg.expert_group_score != topk.group_score:
        raise ValueError(f"family '{cfg.family}' exports as {family.architecture}, whose topk_method {topk.grouped} "
                         f"ranks expert groups by expert_group_score={topk.group_score!r}, not {cfg.expert_group_score!r}")
    carried = family.carried_fields() | {"family", "rope_theta", "rope_scaling"}
    if topk:
        carried.add("expert_group_score")
    if family.layer_types:
        carried |= {"sliding_window", "window_layers"}
    skipped = _unused_fields(cfg) | set(TRAINING_ONLY) | set(FOLDED)
    defaults = ModelConfig()
    for f in dataclasses.fields(ModelConfig):
        if f.name in carried or f.name in skipped:
            continue
        expected = family.implied.get(f.name, getattr(defaults, f.name))
        if getattr(cfg, f.name) != expected:
            raise ValueError(
                f"family '{cfg.family}' exports as {family.architecture}, which cannot hold "
                f"{f.name}={getattr(cfg, f.name)!r} (it has {f.name}={expected!r})"
            )
    return family


# ---- config ----------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, token_ids: dict[str, int | None]) -> dict[str, Any]:
    """config.json for the family's transformers class."""
    family = check_exportable(cfg)
    config: dict[str, Any] = {"architectures": [family.architecture], "model_type": hf_model_type(cfg)}
    for key, ours in family.config_keys().items():
        config[key] = any(getattr(cfg, f) for f in ours) if isinstance(ours, tuple) else getattr(cfg, ours)
        if key in ZERO_IS_NONE and config[key] == 0:
            config[key] = None
    config.update(_rope_to_hf(cfg))
    if family.shared_width:
        config[family.shared_width] = cfg.n_shared_experts * cfg.moe_ffn_dim
    if family.layer_types:
        windows = cfg.layer_windows()
        config["sliding_window"] = next((w for w in windows if w is not None), None)
        config["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in windows]
        if config["query_pre_attn_scalar"] is None:  # ours then scales by head_dim^-0.5
            config["query_pre_attn_scalar"] = cfg.head_dim
    config.update({k: v[0] if isinstance(v, tuple) else v for k, v in family.constants.items()})
    if family.topk_method:
        config["topk_method"] = family.topk_method.for_config(cfg)
    config.update(
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
        torch_dtype="float32",
        bos_token_id=None,
        eos_token_id=token_ids[ENDOFTEXT],
        pad_token_id=token_ids[ENDOFTEXT],
    )
    return config


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    rope_theta, rope_scaling = cfg.rope_theta, None
    scaling = cfg.rope_scaling
    if scaling and scaling["type"] == "ntk":
        # Static NTK-aware scaling is just a larger base: export it as one (exactly what we compute).
        rope_theta = cfg.rope_theta * float(scaling["factor"]) ** (cfg.head_dim / (cfg.head_dim - 2))
    elif scaling and scaling["type"] == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(scaling["factor"])}
    elif scaling and scaling["type"] == "dynamic":
        raise ValueError("rope_scaling type 'dynamic' has no faithful Hugging Face export "
                         "(transformers takes the original length from max_position_embeddings); "
                         "export a model with a fixed scaling (ntk, yarn, linear)")
    elif scaling and scaling["type"] == "yarn":
        rope_scaling = {
            "rope_type": "yarn",
            "factor": float(scaling["factor"]),
            "original_max_position_embeddings": scaling["original_max_seq_len"],
            **{k: float(scaling[k]) for k in YARN_MSCALES if k in scaling},
        }
    elif scaling and scaling["type"] == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": scaling["original_max_seq_len"],
        }
    elif scaling and scaling["type"] == "longrope":
        # Phi-3 keeps the original length beside rope_scaling (it wins over one inside) and,
        # without a factor, takes max_position_embeddings / original: written, so ours holds.
        rope_scaling = {
            "rope_type": "longrope",
            "factor": float(scaling["factor"]),
            "short_factor": [float(f) for f in scaling["short_factor"]],
            "long_factor": [float(f) for f in scaling["long_factor"]],
        }
        return {"rope_theta": rope_theta, "rope_scaling": rope_scaling,
                "original_max_position_embeddings": scaling["original_max_seq_len"]}
    return {"rope_theta": rope_theta, "rope_scaling": rope_scaling}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json of a supported family."""
    model_type = hf.get("model_type")
    if model_type not in HF_FAMILIES:
        from llm_lifecycle.models.hf_remote import REMOTE_FAMILIES

        supported = ", ".join([*HF_FAMILIES, *REMOTE_FAMILIES])
        raise ValueError(f"model_type {model_type!r} is not supported for import; supported: {supported}")
    family = HF_FAMILIES[model_type]
    for key, accepted in family.constants.items():
        accepted = accepted if isinstance(accepted, tuple) else (accepted,)
        if key in hf and hf[key] not in accepted:
            raise ValueError(f"{family.architecture} checkpoints with {key}={hf[key]!r} are not supported (only {accepted[0]!r})")
    fields: dict[str, Any] = {"family": model_type, **family.implied}
    for key, ours in family.config_keys().items():
        value = _hf_value(hf, key, family)
        if value is not None:
            fields.update(dict.fromkeys(ours, value) if isinstance(ours, tuple) else {ours: value})
    fields.setdefault("n_kv_heads", hf["num_attention_heads"])  # absent: multi-head attention
    if family.topk_method:
        fields.update(family.topk_method.fields(hf, family.architecture))
    if family.shared_width:  # one shared expert of that width = that many experts' worth of width
        width, expert = hf[family.shared_width], fields["moe_ffn_dim"]
        if width % expert:
            raise ValueError(f"{family.shared_width} ({width}) is not a multiple of moe_intermediate_size ({expert})")
        fields["n_shared_experts"] = width // expert
    if family.layer_types:
        fields["sliding_window"] = _windows_from_layer_types(hf)
    fields.update(_rope_from_hf(hf, family.yarn_mscales))
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def _windows_from_layer_types(hf: dict[str, Any]) -> list[int | None] | None:
    """Each layer's window from layer_types (absent: Gemma 2's default, local layers first)."""
    window, n = hf.get("sliding_window", 4096), hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    windows = [window if t == "sliding_attention" else None for t in types]
    return windows if any(w is not None for w in windows) else None


def _hf_value(hf: dict[str, Any], key: str, family: Family) -> Any:
    """A config.json value: under its key or another spelling, inside transformers 5's
    rope_parameters, or the class default the file relies on."""
    for k in (key, KEY_ALIASES.get(key)):
        if k and hf.get(k) is not None:
            return hf[k]
    rope = hf.get("rope_parameters") or {}
    if rope.get(key) is not None:
        return rope[key]
    return {**HF_DEFAULTS, **family.defaults}.get(key)


def _rope_from_hf(hf: dict[str, Any], yarn_mscales: bool = False) -> dict[str, Any]:
    """rope_theta and rope_scaling from either the classic keys or transformers 5's rope_parameters;
    `yarn_mscales`: the family's YaRN may carry DeepSeek's mscale and mscale_all_dim."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10_000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    if kind == "linear":
        return {"rope_theta": theta, "rope_scaling": {"type": "linear", "factor": float(params["factor"])}}
    if kind in ("longrope", "su") or (kind == "yarn" and hf.get("model_type") == "phi3"):
        return {"rope_theta": theta, "rope_scaling": _longrope_from_hf(hf, params)}
    if kind == "yarn":
        mscales = {k: float(params[k]) for k in YARN_MSCALES if params.get(k)} if yarn_mscales else {}
        tuned = {k for k in ("attention_factor", *YARN_MSCALES) if params.get(k) is not None} - set(mscales)
        if tuned or params.get("beta_fast", 32) != 32 or params.get("beta_slow", 1) != 1 or params.get("truncate") is False:
            raise ValueError(f"YaRN with non-default parameters is not supported: {params}")
        original = params.get("original_max_position_embeddings") or hf["max_position_embeddings"]
        return {"rope_theta": theta, "rope_scaling": {"type": "yarn", "factor": float(params["factor"]),
                                                      "original_max_seq_len": int(original), **mscales}}
    if kind == "llama3":
        return {"rope_theta": theta, "rope_scaling": {
            "type": "llama3",
            "factor": float(params["factor"]),
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_max_seq_len": int(params["original_max_position_embeddings"]),
        }}
    raise ValueError(f"RoPE type {kind!r} is not supported for import; supported: default, linear, yarn, llama3, longrope")


def _longrope_from_hf(hf: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's LongRoPE ("su" in the first Phi-3 configs; Phi-3 reads "yarn" as it too), read as
    transformers does: the original length beside rope_scaling first, the factor when absent
    max_position_embeddings / original, and the cos/sin scale the paper's (none given)."""
    if params.get("attention_factor") is not None:
        raise ValueError(f"LongRoPE with a given attention_factor is not supported: {params}")
    original = int(hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or hf["max_position_embeddings"])
    factor = float(params.get("factor") or hf["max_position_embeddings"] / original)
    return {
        "type": "longrope",
        "factor": max(factor, 1.0),  # at or below 1 both sides leave cos/sin unscaled
        "original_max_seq_len": original,
        "short_factor": [float(f) for f in params["short_factor"]],
        "long_factor": [float(f) for f in params["long_factor"]],
    }


# ---- weights ---------------------------------------------------------------------------------


def to_hf_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    family = family_of(cfg)
    state = _adapt(cfg, family, fold_norm_head(cfg, state), to_hf=True)
    names, top = family.layer_names(), family.top_names()
    fused_parts = {part: hf for hf, parts in family.fused.items() for part in parts}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # HF re-ties it from embed_tokens
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if not match:
            out[top[name]] = tensor
            continue
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest in family.expert_projs:  # stacked [E, out, in] -> one Linear weight per expert
            for e in range(tensor.size(0)):
                out[prefix + family.experts.format(e=e, proj=family.expert_projs[rest])] = tensor[e]
        elif rest in fused_parts:
            hf = fused_parts[rest]
            out[prefix + hf] = torch.cat([state[f"layers.{layer}.{part}"] for part in family.fused[hf]])
        else:
            out[prefix + names[rest]] = tensor
    for layer in range(cfg.n_layers):
        for ours, zeros in _zero_biases(cfg, family).items():
            out[f"model.layers.{layer}.{names[ours]}"] = zeros
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _zero_biases(cfg: ModelConfig, family: Family) -> dict[str, torch.Tensor]:
    """Attention biases the HF layout has (its one `attention_bias` flag is on) that `cfg` lacks, as zeros."""
    if family.config.get("attention_bias") != _ATTENTION_BIAS["attention_bias"] or not (cfg.qkv_bias or cfg.o_bias):
        return {}
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    biases = {}
    if not cfg.qkv_bias:
        biases.update({"attn.wq.bias": torch.zeros(q_out), "attn.wk.bias": torch.zeros(kv_out), "attn.wv.bias": torch.zeros(kv_out)})
    if not cfg.o_bias:
        biases["attn.wo.bias"] = torch.zeros(cfg.dim)
    return biases


def from_hf_state_dict(cfg: ModelConfig, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state_dict (with lm_head.weight even when tied) from HF tensors of either expert layout."""
    family = family_of(cfg)
    to_ours = {hf: ours for ours, hf in family.layer_names().items()}
    top = {hf: ours for ours, hf in family.top_names().items()}
    proj_to_ours = {proj: ours for ours, proj in family.expert_projs.items()}
    expert_prefix, _ = family.experts.split("{e}")
    per_expert = re.compile(re.escape(expert_prefix) + r"(\d+)\." + r"(\w+)\.weight")
    state: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in hf_state.items():
        if name in top:
            state[top[name]] = tensor
            continue
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if not match:
            raise ValueError(f"unexpected tensor {name!r} in a {cfg.family} checkpoint")
        layer, rest = match.groups()
        if int(layer) >= cfg.n_layers:
            continue  # DeepSeek-V3's multi-token-prediction layers: a training aid, not part of next-token logits
        prefix = f"layers.{layer}."
        expert = per_expert.fullmatch(rest)
        if expert and expert.group(2) in proj_to_ours:
            experts.setdefault((prefix, proj_to_ours[expert.group(2)]), {})[int(expert.group(1))] = tensor
        elif rest == expert_prefix + "gate_up_proj":  # transformers 5's fused expert layout [E, 2F, D]
            state[prefix + "ffn.w_gate"], state[prefix + "ffn.w_up"] = tensor.chunk(2, dim=1)
        elif rest == expert_prefix + "down_proj":
            state[prefix + "ffn.w_down"] = tensor
        elif rest in family.fused:
            parts = family.fused[rest]
            for part, piece in zip(parts, tensor.split([_rows(cfg, part) for part in parts])):
                state[prefix + part] = piece
        elif rest in to_ours:
            state[prefix + to_ours[rest]] = tensor
        else:
            raise ValueError(f"unexpected tensor {name!r} in a {cfg.family} checkpoint")
    for (prefix, ours), by_index in experts.items():
        state[prefix + ours] = torch.stack([by_index[e] for e in range(cfg.n_experts)])
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_embeddings.weight"]
    return {k: v.contiguous() for k, v in _adapt(cfg, family, state, to_hf=False).items()}


def _rows(cfg: ModelConfig, name: str) -> int:
    """Output rows of one of our projections that a family fuses with others."""
    if name.startswith("attn.wq."):
        return cfg.n_heads * cfg.head_dim
    if name.startswith(("attn.wk.", "attn.wv.")):
        return cfg.n_kv_heads * cfg.head_dim
    return cfg.ffn_dim  # ffn.w_gate, ffn.w_up


def _adapt(cfg: ModelConfig, family: Family, state: dict[str, torch.Tensor], to_hf: bool) -> dict[str, torch.Tensor]:
    """The family's value conventions that differ from ours, applied to (our-named) tensors."""
    if family.norm_offset:
        for name in state:
            if name.endswith("norm.weight"):
                state[name] = state[name] - 1 if to_hf else state[name] + 1
    if family.rope_interleaved:
        for name, (heads, start) in rotary_rows(cfg).items():
            if name in state:
                state[name] = permute_rotary(state[name], heads, start, cfg.rotary_dim, to_hf)
    return state


def rotary_rows(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Projections whose output rows RoPE rotates: name -> (heads, first rotated row in a head)."""
    rows = {}
    for layer in range(cfg.n_layers):
        if cfg.is_mla:  # the rotated slice follows the no-RoPE part of each query head and the latent
            rows[f"layers.{layer}.attn.{'wq_b' if cfg.q_lora_rank else 'wq'}.weight"] = (cfg.n_heads, cfg.qk_nope_head_dim)
            rows[f"layers.{layer}.attn.wkv_a.weight"] = (1, cfg.kv_lora_rank)
            continue
        for proj, heads in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads)):
            for kind in ("weight", "bias"):
                rows[f"layers.{layer}.attn.{proj}.{kind}"] = (heads, 0)
    return rows


def permute_rotary(t: torch.Tensor, heads: int, start: int, rotary: int, to_hf: bool) -> torch.Tensor:
    """Reorder each head's rotated rows between the interleaved layout (pairs 2i, 2i+1) and
    ours (pairs i, i + rotary/2): the same rotation, so q.k and the logits do not change."""
    halves = torch.cat((torch.arange(0, rotary, 2), torch.arange(1, rotary, 2)))  # ours[j] = interleaved[halves[j]]
    order = halves.argsort() if to_hf else halves
    t = t.reshape(heads, -1, *t.shape[1:]).clone()
    t[:, start : start + rotary] = t[:, start : start + rotary][:, order]
    return t.reshape(-1, *t.shape[2:])


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(hf_dir / shard)).items()}
    single = hf_dir / "model.safetensors"
    if not single.is_file():
        # Pickled weights (pytorch_model.bin) can run code when loaded: we never unpickle them.
        raise FileNotFoundError(
            f"{hf_dir}: no model.safetensors or model.safetensors.index.json; only safetensors weights are "
            "loaded (pickle files such as pytorch_model.bin are never opened); convert them to safetensors first"
        )
    return load_file(str(single))


# ---- public ----------------------------------------------------------------------------------


def export_hf(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write our model directory as a Hugging Face folder that `AutoModelForCausalLM` and
    `AutoTokenizer` load (atomic: written beside `out_dir`, then renamed into place)."""
    model, tokenizer = load_model_dir(model_dir)
    if tokenizer is None:
        raise FileNotFoundError(f"{model_dir}: no {TOKENIZER_FILE}; a Hugging Face export needs the tokenizer")
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"{model_dir}: tokenizer lacks the special token(s) {', '.join(missing)}")
    cfg = model.cfg
    config = hf_config(cfg, ids)
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file(to_hf_state_dict(cfg, model.state_dict()), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(Path(model_dir) / TOKENIZER_FILE, tmp / "tokenizer.json")
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": IM_END,  # a chat turn ends here; generation_config also stops at <|endoftext|>
            "pad_token": ENDOFTEXT,
            "unk_token": None,
            "additional_special_tokens": [IM_START, IM_END],
            "model_max_length": cfg.max_seq_len,
            "clean_up_tokenization_spaces": False,
            "chat_template": chatml_template(read_config(model_dir).get("system_prompt")),
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(
            json.dumps({"eos_token": IM_END, "pad_token": ENDOFTEXT, "additional_special_tokens": [IM_START, IM_END]}, indent=2),
            encoding="utf-8",
        )
        generation_config = {
            "bos_token_id": None,
            "eos_token_id": [ids[IM_END], ids[ENDOFTEXT]],
            "pad_token_id": ids[ENDOFTEXT],
            "do_sample": False,
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2), encoding="utf-8")
    return Path(out_dir)


def import_hf(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, our state_dict) from a local Hugging Face folder of a supported family."""
    hf_dir = Path(hf_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    from llm_lifecycle.models.hf_remote import REMOTE_FAMILIES, import_remote

    hf = json.loads(config_file.read_text(encoding="utf-8"))
    if hf.get("model_type") in REMOTE_FAMILIES:  # remote-code layouts: our own mapping, their code never runs
        return import_remote(hf, _read_hf_weights(hf_dir))
    cfg = config_from_hf(hf)
    return cfg, from_hf_state_dict(cfg, _read_hf_weights(hf_dir))


def load_hf(hf_dir: str | Path, device: str = "cpu"):
    """(Decoder in eval mode, tokenizers.Tokenizer or None) from a local Hugging Face folder.

    A tokenizer without our special tokens (docs/CONTRACTS.md) gets them added, and the
    embedding (and head) grows by as many rows, each the mean of the existing rows."""
    from llm_lifecycle.models.decoder import Decoder

    cfg, state = import_hf(hf_dir)
    tokenizer = _hf_tokenizer(Path(hf_dir))
    if tokenizer is not None:
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        tokenizer.add_special_tokens(missing)
        if tokenizer.get_vocab_size() > cfg.vocab_size:
            cfg, state = grow_vocab(cfg, state, tokenizer.get_vocab_size())
    model = Decoder(cfg)
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer


def _hf_tokenizer(hf_dir: Path):
    """tokenizer.json, or the fast tokenizer transformers converts from the folder's files."""
    from tokenizers import Tokenizer

    if (hf_dir / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    if not (hf_dir / "tokenizer_config.json").is_file():
        return None
    remote = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("auto_map")
    if remote:  # Qwen 1, Baichuan, ChatGLM, InternLM2 ship their tokenizer class as code too
        raise ValueError(
            f"{hf_dir}: the tokenizer is remote code ({remote.get('AutoTokenizer')}), which is never run; "
            "put a tokenizer.json (the fast tokenizer) in the folder"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=False).backend_tokenizer
