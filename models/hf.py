"""Hugging Face checkpoints: export ours as LlamaForCausalLM / Qwen3MoeForCausalLM folders,
and import those families' folders (from the Hub or disk) as a ModelConfig + our state_dict.

The files are written in the layout the published checkpoints use (config.json with
`rope_theta`/`rope_scaling`, one tensor per expert), which every transformers version reads;
transformers 5 fuses the experts itself when it loads them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llm_lifecycle.models.atomic import atomic_dir
from llm_lifecycle.models.checkpoint import SPECIAL_TOKENS, TOKENIZER_FILE, load_model_dir
from llm_lifecycle.models.config import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
ENDOFTEXT, IM_START, IM_END = SPECIAL_TOKENS
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Our parameter names -> Hugging Face names, inside layer i ("layers.{i}." / "model.layers.{i}.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w_gate.weight": "mlp.gate_proj.weight",
    "ffn.w_up.weight": "mlp.up_proj.weight",
    "ffn.w_down.weight": "mlp.down_proj.weight",
    "ffn.router.weight": "mlp.gate.weight",
}
_EXPERT_NAMES = {"ffn.w_gate": "gate_proj", "ffn.w_up": "up_proj", "ffn.w_down": "down_proj"}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}


# ---- config ----------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, token_ids: dict[str, int | None]) -> dict[str, Any]:
    """config.json for the family's transformers class."""
    if cfg.family == "llama" and (cfg.is_moe or cfg.qk_norm):
        raise ValueError("family 'llama' exports as LlamaForCausalLM, which has no MoE layers and no q/k-norm")
    if cfg.family == "qwen3_moe" and not (cfg.is_moe and cfg.qk_norm):
        raise ValueError("family 'qwen3_moe' exports as Qwen3MoeForCausalLM, which needs n_experts > 0 and qk_norm")
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
    config = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        # HF's attention_bias puts a bias on o_proj too; ours is exported as zeros.
        "attention_bias": cfg.qkv_bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": token_ids[ENDOFTEXT],
        "pad_token_id": token_ids[ENDOFTEXT],
    }
    if cfg.family == "llama":
        config.update(mlp_bias=False, pretraining_tp=1)
    else:
        config.update(
            num_experts=cfg.n_experts,
            num_experts_per_tok=cfg.n_experts_per_token,
            moe_intermediate_size=cfg.moe_ffn_dim,
            norm_topk_prob=cfg.norm_topk_prob,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=False,
            sliding_window=None,
            output_router_logits=False,
        )
    return config


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json of a supported family."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise ValueError(
            f"model_type {family!r} is not supported for import; supported: {', '.join(ARCHITECTURES)}"
        )
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias", False):
        raise ValueError("only SwiGLU MLPs without bias (hidden_act silu, mlp_bias false) can be imported")
    fields: dict[str, Any] = dict(
        family=family,
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"],
        norm_eps=hf["rms_norm_eps"],
        max_seq_len=hf["max_position_embeddings"],
        qkv_bias=bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **_rope_from_hf(hf),
    )
    if family == "qwen3_moe":
        if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            raise ValueError("Qwen3-MoE checkpoints with dense layers (decoder_sparse_step/mlp_only_layers) are not supported")
        if hf.get("use_sliding_window"):
            raise ValueError("Qwen3-MoE checkpoints with sliding-window attention are not supported")
        fields.update(
            qk_norm=True,
            n_experts=hf.get("num_experts") or hf["num_local_experts"],  # transformers 5 writes the alias
            n_experts_per_token=hf["num_experts_per_tok"],
            moe_ffn_dim=hf["moe_intermediate_size"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        )
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
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # HF re-ties it from embed_tokens
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if not match:
            out[_TOP_NAMES[name]] = tensor
            continue
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest in _EXPERT_NAMES:  # stacked [E, out, in] -> one Linear weight per expert
            for e in range(tensor.size(0)):
                out[f"{prefix}mlp.experts.{e}.{_EXPERT_NAMES[rest]}.weight"] = tensor[e]
            continue
        out[prefix + _LAYER_NAMES[rest]] = tensor
        if rest == "attn.wq.bias":
            out[prefix + "self_attn.o_proj.bias"] = torch.zeros(cfg.dim, dtype=tensor.dtype)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def from_hf_state_dict(cfg: ModelConfig, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state_dict (with lm_head.weight even when tied) from HF tensors of either expert layout."""
    to_ours = {hf: ours for ours, hf in _LAYER_NAMES.items()}
    state: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in hf_state.items():
        top = {hf: ours for ours, hf in _TOP_NAMES.items()}.get(name)
        if top:
            state[top] = tensor
            continue
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if not match:
            raise ValueError(f"unexpected tensor {name!r} in a {cfg.family} checkpoint")
        layer, rest = match.groups()
        prefix = f"layers.{layer}."
        per_expert = re.fullmatch(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", rest)
        if per_expert:
            e, proj = per_expert.groups()
            experts.setdefault((prefix, f"ffn.w_{proj}"), {})[int(e)] = tensor
        elif rest == "mlp.experts.gate_up_proj":  # transformers 5's fused layout [E, 2F, D]
            state[prefix + "ffn.w_gate"], state[prefix + "ffn.w_up"] = tensor.chunk(2, dim=1)
        elif rest == "mlp.experts.down_proj":
            state[prefix + "ffn.w_down"] = tensor
        elif rest == "self_attn.o_proj.bias":
            if tensor.abs().max() > 0:
                raise ValueError(f"{name}: a non-zero output-projection bias cannot be represented (qkv_bias only)")
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
