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
from llm_lifecycle.models.checkpoint import SPECIAL_TOKENS, TOKENIZER_FILE, load_model_dir
from llm_lifecycle.models.config import ModelConfig

ENDOFTEXT, IM_START, IM_END = SPECIAL_TOKENS
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

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
    "ffn.w_gate.weight": "mlp.gate_proj.weight",
    "ffn.w_up.weight": "mlp.up_proj.weight",
    "ffn.w_down.weight": "mlp.down_proj.weight",
    "ffn.router.weight": "mlp.gate.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
# Our stacked expert weights [n_experts, out, in] -> the projection name in the family's per-expert template.
EXPERT_PROJS = {"ffn.w_gate": "gate_proj", "ffn.w_up": "up_proj", "ffn.w_down": "down_proj"}
# Fields that only matter for MoE layers, and training settings no config.json needs to carry.
MOE_FIELDS = ("n_experts_per_token", "moe_ffn_dim", "norm_topk_prob", "router_aux_loss_coef")
TRAINING_ONLY = ("router_aux_loss_coef",)
SILU = {"hidden_act": "silu"}
# Other spellings of a config.json key that some transformers versions write (5.x: num_local_experts).
KEY_ALIASES = {"num_experts": "num_local_experts", "n_routed_experts": "num_local_experts"}


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
    names: dict[str, str] = field(default_factory=dict)  # overrides of COMMON_NAMES
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # HF name in a layer -> our names, concatenated on dim 0
    experts: str = "mlp.experts.{e}.{proj}.weight"  # per-expert tensor names, inside a layer
    expert_projs: dict[str, str] = field(default_factory=lambda: dict(EXPERT_PROJS))
    moe: bool = False

    def config_keys(self) -> dict[str, str | tuple[str, ...]]:
        """config.json key -> our field(s) (one key per field; a family's own key wins)."""
        keys = {k: f for k, f in COMMON_CONFIG.items() if f not in self.config.values()}
        return {**keys, **self.config}

    def carried_fields(self) -> set[str]:
        return {f for v in self.config_keys().values() for f in (v if isinstance(v, tuple) else (v,))}

    def layer_names(self) -> dict[str, str]:
        return {**COMMON_NAMES, **self.names}


_MOE_CONFIG = {"num_experts_per_tok": "n_experts_per_token", "router_aux_loss_coef": "router_aux_loss_coef"}
_ATTENTION_BIAS = {"attention_bias": ("qkv_bias", "o_bias")}  # one flag for q, k, v and o biases

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
    "mistral": Family("MistralForCausalLM", constants={**SILU, "sliding_window": None}),
    # Mixtral renormalises its top-k softmax probabilities, i.e. norm_topk_prob.
    "mixtral": Family(
        "MixtralForCausalLM",
        config={"num_local_experts": "n_experts", "intermediate_size": "moe_ffn_dim", **_MOE_CONFIG},
        implied={"norm_topk_prob": True},
        constants={**SILU, "sliding_window": None, "router_jitter_noise": 0.0},
        names={"ffn.router.weight": "block_sparse_moe.gate.weight"},
        experts="block_sparse_moe.experts.{e}.{proj}.weight",
        expert_projs={"ffn.w_gate": "w1", "ffn.w_up": "w3", "ffn.w_down": "w2"},
        moe=True,
    ),
}


def family_of(cfg: ModelConfig) -> Family:
    if cfg.family not in HF_FAMILIES:
        raise ValueError(
            f"family '{cfg.family}' has no transformers layout; families that export: {', '.join(HF_FAMILIES)}"
        )
    return HF_FAMILIES[cfg.family]


def _unused_fields(cfg: ModelConfig) -> set[str]:
    """Fields whose value does not change this model's computation."""
    if not cfg.is_moe:
        return set(MOE_FIELDS)
    return {"ffn_dim"}  # every layer is MoE


def check_exportable(cfg: ModelConfig) -> Family:
    """The family's row, after checking that its layout holds every design choice of `cfg`."""
    family = family_of(cfg)
    if family.moe != cfg.is_moe:
        need = "n_experts > 0" if family.moe else "n_experts = 0 (dense)"
        raise ValueError(f"family '{cfg.family}' exports as {family.architecture}, which needs {need}")
    carried = family.carried_fields() | {"family", "rope_theta", "rope_scaling"}
    skipped = _unused_fields(cfg) | set(TRAINING_ONLY)
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
    config: dict[str, Any] = {"architectures": [family.architecture], "model_type": cfg.family}
    for key, ours in family.config_keys().items():
        config[key] = any(getattr(cfg, f) for f in ours) if isinstance(ours, tuple) else getattr(cfg, ours)
    config.update(_rope_to_hf(cfg))
    config.update({k: v[0] if isinstance(v, tuple) else v for k, v in family.constants.items()})
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
    elif scaling and scaling["type"] == "yarn":
        rope_scaling = {
            "rope_type": "yarn",
            "factor": float(scaling["factor"]),
            "original_max_position_embeddings": scaling["original_max_seq_len"],
        }
    elif scaling and scaling["type"] == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": scaling["original_max_seq_len"],
        }
    return {"rope_theta": rope_theta, "rope_scaling": rope_scaling}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json of a supported family."""
    model_type = hf.get("model_type")
    if model_type not in HF_FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported for import; supported: {', '.join(HF_FAMILIES)}")
    family = HF_FAMILIES[model_type]
    for key, accepted in family.constants.items():
        accepted = accepted if isinstance(accepted, tuple) else (accepted,)
        if key in hf and hf[key] not in accepted:
            raise ValueError(f"{family.architecture} checkpoints with {key}={hf[key]!r} are not supported (only {accepted[0]!r})")
    fields: dict[str, Any] = {"family": model_type, **family.implied}
    for key, ours in family.config_keys().items():
        value = hf.get(key, hf.get(KEY_ALIASES.get(key, key)))
        if value is not None:
            fields.update(dict.fromkeys(ours, value) if isinstance(ours, tuple) else {ours: value})
    fields.setdefault("n_kv_heads", hf["num_attention_heads"])  # absent: multi-head attention
    fields.update(_rope_from_hf(hf))
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and rope_scaling from either the classic keys or transformers 5's rope_parameters."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10_000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    if kind == "linear":
        return {"rope_theta": theta, "rope_scaling": {"type": "linear", "factor": float(params["factor"])}}
    if kind == "yarn":
        tuned = {k: params[k] for k in ("attention_factor", "mscale", "mscale_all_dim") if params.get(k) is not None}
        if tuned or params.get("beta_fast", 32) != 32 or params.get("beta_slow", 1) != 1 or params.get("truncate") is False:
            raise ValueError(f"YaRN with non-default parameters is not supported: {params}")
        original = params.get("original_max_position_embeddings") or hf["max_position_embeddings"]
        return {"rope_theta": theta, "rope_scaling": {"type": "yarn", "factor": float(params["factor"]), "original_max_seq_len": int(original)}}
    if kind == "llama3":
        return {"rope_theta": theta, "rope_scaling": {
            "type": "llama3",
            "factor": float(params["factor"]),
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_max_seq_len": int(params["original_max_position_embeddings"]),
        }}
    raise ValueError(f"RoPE type {kind!r} is not supported for import; supported: default, linear, yarn, llama3")


# ---- weights ---------------------------------------------------------------------------------


def to_hf_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    family = family_of(cfg)
    names = family.layer_names()
    fused_parts = {part: hf for hf, parts in family.fused.items() for part in parts}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # HF re-ties it from embed_tokens
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if not match:
            out[TOP_NAMES[name]] = tensor
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
    top = {hf: ours for ours, hf in TOP_NAMES.items()}
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
        prefix = f"layers.{layer}."
        expert = per_expert.fullmatch(rest)
        if expert and expert.group(2) in proj_to_ours:
            experts.setdefault((prefix, proj_to_ours[expert.group(2)]), {})[int(expert.group(1))] = tensor
        elif rest == expert_prefix + "gate_up_proj":  # transformers 5's fused expert layout [E, 2F, D]
            state[prefix + "ffn.w_gate"], state[prefix + "ffn.w_up"] = tensor.chunk(2, dim=1)
        elif rest == expert_prefix + "down_proj":
            state[prefix + "ffn.w_down"] = tensor
        elif rest in family.fused:
            for part, piece in zip(family.fused[rest], tensor.chunk(len(family.fused[rest]))):
                state[prefix + part] = piece
        elif rest in to_ours:
            state[prefix + to_ours[rest]] = tensor
        else:
            raise ValueError(f"unexpected tensor {name!r} in a {cfg.family} checkpoint")
    for (prefix, ours), by_index in experts.items():
        state[prefix + ours] = torch.stack([by_index[e] for e in range(cfg.n_experts)])
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_embeddings.weight"]
    return {k: v.contiguous() for k, v in state.items()}


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
            "chat_template": CHATML_TEMPLATE,
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
    cfg = config_from_hf(json.loads(config_file.read_text(encoding="utf-8")))
    return cfg, from_hf_state_dict(cfg, _read_hf_weights(hf_dir))


def load_hf(hf_dir: str | Path, device: str = "cpu"):
    """(Decoder in eval mode, tokenizers.Tokenizer or None) from a local Hugging Face folder."""
    from tokenizers import Tokenizer

    from llm_lifecycle.models.decoder import Decoder

    cfg, state = import_hf(hf_dir)
    model = Decoder(cfg)
    model.load_state_dict(state)
    tokenizer_file = Path(hf_dir) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file.is_file() else None
    return model.to(device).eval(), tokenizer
