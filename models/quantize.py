"""Int8 weight-only quantization, symmetric, one scale per output channel.

Each output row of a weight matrix gets scale = max|w| / 127 and is stored as round(w / scale)
in int8; activations stay in floating point. That quarters the bytes of every quantized
matrix (plus one scale per row) at a relative error of about 0.5% per output.

`quantize_int8` swaps nn.Linear modules for `Int8Linear` and the MoE layers' stacked 3-D
expert weights for `Int8ExpertWeights`, in place. The embedding, the LM head and the MoE
router stay in full precision by default: the first two are the most sensitive layers of a
small model (and are tied in many), and rounding the router can change which experts a
token goes to (vLLM and AutoGPTQ keep the MoE gate unquantized too).

A quantized model directory is our usual one (config.json, model.safetensors,
tokenizer.json) with int8 tensors and scales in the safetensors file and
"quantization": {"method": "int8-weight-only", "skip": [...]} in config.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from llm_lifecycle.models.atomic import atomic_dir
from llm_lifecycle.models.checkpoint import CONFIG_FILE, FORMAT, TOKENIZER_FILE, WEIGHTS_FILE, read_config
from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder

METHOD = "int8-weight-only"
DEFAULT_SKIP = ("lm_head", "embed", "router")


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., out, in] -> (int8 [..., out, in], scale [..., out] in weight's dtype),
    with weight ~= int8 * scale[..., None]."""
    w = weight.detach().float()
    # Round the scale to its storage dtype first, so the int8 values fit the scale kept.
    scale = (w.abs().amax(dim=-1) / 127).to(weight.dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(weight.dtype)


def _int8_kernel_applies(x: torch.Tensor, in_features: int) -> bool:
    """torch._weight_int8pack_mm on CPU: measured 3-4x faster than dequantize + matmul for
    bf16 inputs, slower for fp32/fp16, and in torch 2.13 it crashes or returns garbage when
    in_features is not a multiple of 8 — so only bf16 and whole groups of 8."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and in_features % 8 == 0
        and hasattr(torch, "_weight_int8pack_mm")
    )


class Int8Linear(nn.Module):
    """y = x (int8_weight * scale)^T + bias; the weight is dequantized per call into x's
    dtype (or multiplied in int8 directly on CPU, see _int8_kernel_applies)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32, device=None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     dtype=linear.weight.dtype, device=linear.weight.device)
        module.weight, module.scale = quantize_per_channel(linear.weight)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _int8_kernel_applies(x, self.in_features):
            flat = x.reshape(-1, self.in_features).contiguous()
            out = torch._weight_int8pack_mm(flat, self.weight, self.scale.to(x.dtype))
            out = out.view(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8ExpertWeights(nn.Module):
    """Stacked expert weights [n_experts, out, in] in int8 with a scale per expert per
    output row. It stands in for the 3-D parameter it replaces: `weights[e]` gives expert
    e's dequantized [out, in] matrix, which is all the MoE layer does with that parameter."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        n_experts, out_features, _ = shape
        self.register_buffer("weight", torch.zeros(tuple(shape), dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(n_experts, out_features, dtype=dtype, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Int8ExpertWeights:
        module = cls(weight.shape, dtype=weight.dtype, device=weight.device)
        module.weight, module.scale = quantize_per_channel(weight)
        return module

    def __getitem__(self, expert: int) -> torch.Tensor:
        return self.weight[expert].to(self.scale.dtype) * self.scale[expert, :, None]

    def extra_repr(self) -> str:
        return "n_experts={}, out_features={}, in_features={}".format(*self.weight.shape)


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(part in name for part in skip)


def quantize_int8(model: nn.Module, skip: Sequence[str] = DEFAULT_SKIP) -> nn.Module:
    """Replace, in place, every nn.Linear and every 3-D (stacked expert) parameter whose
    qualified name contains none of the `skip` substrings; returns `model`. The method and
    skip list are recorded as `model.quantization` for save_quantized."""
    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and not _skipped(f"{module_name}.{child_name}", skip):
                setattr(module, child_name, Int8Linear.from_linear(child))
        for param_name, param in list(module.named_parameters(recurse=False)):
            if param.ndim == 3 and not _skipped(f"{module_name}.{param_name}", skip):
                delattr(module, param_name)
                setattr(module, param_name, Int8ExpertWeights.from_weight(param))
    model.quantization = {"method": METHOD, "skip": list(skip)}
    return model


def int8_state_dict_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict, tensors that share memory (tied weights) counted once:
    what model.safetensors holds, less its header."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def save_quantized(
    path: str | Path, model: Decoder, tokenizer, model_config_dict: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a model quantized by quantize_int8 as a model directory (atomically).
    `model_config_dict` defaults to model.cfg.to_dict(); `extra` adds keys to config.json."""
    quantization = getattr(model, "quantization", None)
    if quantization is None:
        raise ValueError("the model is not quantized; call quantize_int8(model) before save_quantized")
    reserved = {"format", "model", "quantization"} & set(extra or {})
    if reserved:
        raise ValueError(f"extra may not set {', '.join(sorted(reserved))}: they describe the model itself")
    config = {
        "format": FORMAT,
        "model": model_config_dict if model_config_dict is not None else model.cfg.to_dict(),
        "quantization": quantization,
        **(extra or {}),
    }
    with atomic_dir(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        save_model(model, str(tmp / WEIGHTS_FILE))  # stores tied tensors once
        if tokenizer is not None:
            tokenizer.save(str(tmp / TOKENIZER_FILE))
    return Path(path)


def load_quantized(path: str | Path, device: str = "cpu"):
    """(quantized Decoder in eval mode on `device`, tokenizers.Tokenizer or None): rebuilds
    the Decoder from config.json, gives it the quantized structure, loads the tensors."""
    from tokenizers import Tokenizer

    path = Path(path)
    config = read_config(path)
    quantization = config.get("quantization") or {}
    if quantization.get("method") != METHOD:
        raise ValueError(f"{path / CONFIG_FILE}: quantization method {quantization.get('method')!r} is not {METHOD!r}")
    model = quantize_int8(Decoder(ModelConfig.from_dict(config["model"])), skip=quantization["skip"])
    load_model(model, str(path / WEIGHTS_FILE), strict=True, device=str(device))
    model.to(device)
    tokenizer_file = path / TOKENIZER_FILE
    tokenizer = Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file.is_file() else None
    return model.eval(), tokenizer
