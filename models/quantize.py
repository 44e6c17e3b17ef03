"""Weight-only quantization to 8 or 4 bits with one scale and zero point per group of input
columns: round-to-nearest (RTN), GPTQ and AWQ.

Each row of a weight matrix is cut into groups of `group_size` input columns (0: the whole
row is one group). A group gets an asymmetric min-max grid: scale = (max - min) / (2^bits - 1),
zero = round(-min / scale), code = clamp(round(w / scale) + zero, 0, 2^bits - 1), and
w ~= (code - zero) * scale. The range always includes 0 so a zero weight stays exactly zero.
Activations stay in floating point; the weight is dequantized per call.

- RTN rounds every weight to its nearest grid point.
- GPTQ (Frantar et al., 2022) rounds one input column at a time and spreads each column's
  rounding error over the columns not yet rounded, weighted by the inverse Hessian
  H = 2 X^T X of the layer's calibration inputs X, so the layer's output error stays small.
- AWQ (Lin et al., 2023) scales input channel j of the weight up by s_j = mean|x_j|^alpha
  before rounding and the activation down by the same s_j, choosing alpha per layer on the
  calibration inputs: the channels that carry large activations lose less precision. We keep
  1/s as a buffer of the layer instead of folding it into the preceding norm, so every linear
  layer (and every MoE expert) gets its own s.

Layers are quantized one transformer block at a time (the calibration inputs of block i come
from the model whose blocks < i are already quantized), as both papers do. The embedding, the
LM head and the MoE router stay in full precision: the first two are the most sensitive layers
of a small model (and tied in many), and rounding the router changes which experts a token
goes to (vLLM and AutoGPTQ keep the gate unquantized too).

A quantized model directory is our usual one (config.json, model.safetensors, tokenizer.json)
with codes, scales and zero points in the safetensors file and
"quantization": {"method", "bits", "group_size", "skip"} in config.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
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

METHODS = ("rtn", "gptq", "awq")
BITS = (8, 4)
DEFAULT_SKIP = ("lm_head", "embed", "router")
AWQ_GRID = 20  # alphas 0, 1/20, ..., 19/20, as in the AWQ paper's search
GPTQ_BLOCK = 128  # columns rounded between two lazy updates of the rest of the matrix
GPTQ_DAMP = 0.01  # fraction of mean(diag H) added to H's diagonal (the paper's default)
MAX_CALIB_ROWS = 4096  # calibration rows kept per layer (AWQ's error search runs on them)


@dataclass(frozen=True)
class QuantConfig:
    method: str = "rtn"  # rtn | gptq | awq
    bits: int = 8  # 8 | 4
    group_size: int = 128  # input columns per scale; 0: one scale per output row
    skip: tuple[str, ...] = DEFAULT_SKIP  # layers whose qualified name contains one of these stay as they are

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization method '{self.method}' is not one of {', '.join(METHODS)}")
        if self.bits not in BITS:
            raise ValueError(f"bits must be 8 or 4, got {self.bits}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0: one group per output row), got {self.group_size}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skip": list(self.skip)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        return cls(method=d["method"], bits=int(d["bits"]), group_size=int(d["group_size"]), skip=tuple(d["skip"]))


# ---- the grid: codes, scales, zero points --------------------------------------------------


def _group_width(in_features: int, group_size: int) -> int:
    return group_size if 0 < group_size < in_features else in_features


def _expand(per_group: torch.Tensor, width: int, in_features: int) -> torch.Tensor:
    """[..., n_groups] -> [..., in_features]: each group's value repeated over its columns."""
    return per_group.repeat_interleave(width, dim=-1)[..., :in_features]


def grid_params(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each [..., out, n_groups] in float32, of the min-max grid of every group."""
    w = weight.detach().float()
    in_features = w.shape[-1]
    width = _group_width(in_features, group_size)
    pad = -in_features % width  # a short last group: zero columns change nothing (0 is in the range)
    groups = F.pad(w, (0, pad)).unflatten(-1, (-1, width))
    low = groups.amin(dim=-1).clamp(max=0)
    high = groups.amax(dim=-1).clamp(min=0)
    scale = (high - low) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
    return scale, torch.round(-low / scale)


def to_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Codes (uint8, one per weight) of `weight` on the grid (scale, zero) [..., n_groups]."""
    in_features = weight.shape[-1]
    width = _group_width(in_features, group_size)
    s, z = _expand(scale, width, in_features), _expand(zero, width, in_features)
    return (torch.round(weight.float() / s) + z).clamp(0, 2**bits - 1).to(torch.uint8)


def from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    in_features = codes.shape[-1]
    width = _group_width(in_features, group_size)
    s, z = _expand(scale.float(), width, in_features), _expand(zero.float(), width, in_features)
    return ((codes.float() - z) * s).to(dtype)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """4-bit codes two to a byte (low nibble first); 8-bit codes as they are."""
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    if bits == 8:
        return packed
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)[..., :in_features]


# ---- the quantized layers ------------------------------------------------------------------


class _QuantizedWeight(nn.Module):
    """Packed codes [..., out, in * bits / 8], float scale and uint8 zero [..., out, n_groups],
    and for AWQ the inverse input scale 1/s [..., in]: the matrix it stands for is
    dequantize(codes) * (1/s), which multiplies x by 1/s before the rounded W s."""

    def __init__(self, shape: Sequence[int], bits: int, group_size: int, act_scale: bool, dtype: torch.dtype):
        super().__init__()
        *lead, out_features, in_features = shape
        self.bits, self.group_size, self.in_features, self.out_features = bits, group_size, in_features, out_features
        n_groups = -(-in_features // _group_width(in_features, group_size))
        packed_in = in_features if bits == 8 else -(-in_features // 2)
        self.register_buffer("weight", torch.zeros(*lead, out_features, packed_in, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(*lead, out_features, n_groups, dtype=dtype))
        self.register_buffer("zero", torch.zeros(*lead, out_features, n_groups, dtype=torch.uint8))
        self.register_buffer("inv_act_scale", torch.ones(*lead, 1, in_features, dtype=dtype) if act_scale else None)

    def load(self, results: Sequence[Quantized]) -> None:
        """Fill from one Quantized per matrix (one, or one per expert)."""
        for buffer, field in (("weight", "packed"), ("scale", "scale"), ("zero", "zero")):
            target = getattr(self, buffer)
            target.copy_(torch.stack([getattr(r, field) for r in results]).view_as(target))
        if self.inv_act_scale is not None:
            self.inv_act_scale.copy_(1 / torch.stack([r.act_scale for r in results]).view_as(self.inv_act_scale))

    def dequantized(self, dtype: torch.dtype, index: int | slice = slice(None)) -> torch.Tensor:
        """The matrix (or, indexed, the experts' matrices) this layer stands for."""
        codes = unpack_codes(self.weight[index], self.bits, self.in_features)
        weight = from_codes(codes, self.scale[index], self.zero[index], self.group_size, dtype)
        return weight if self.inv_act_scale is None else weight * self.inv_act_scale[index].to(dtype)


class QuantizedLinear(_QuantizedWeight):
    """Stands in for an nn.Linear: y = x W^T + b with W dequantized per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 act_scale: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__((out_features, in_features), bits, group_size, act_scale, dtype)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def like(cls, linear: nn.Linear, cfg: QuantConfig) -> QuantizedLinear:
        return cls(linear.in_features, linear.out_features, linear.bias is not None, cfg.bits, cfg.group_size,
                   act_scale=cfg.method == "awq", dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class QuantizedExperts(_QuantizedWeight):
    """Stands in for a stacked expert weight [n_experts, out, in]: `experts[e]` (or
    `experts[:]`) is the dequantized matrix, which is all the MoE layer does with it."""

    @classmethod
    def like(cls, weight: torch.Tensor, cfg: QuantConfig) -> QuantizedExperts:
        return cls(weight.shape, cfg.bits, cfg.group_size, act_scale=cfg.method == "awq", dtype=weight.dtype)

    def __getitem__(self, index: int | slice) -> torch.Tensor:
        return self.dequantized(self.scale.dtype, index)

    def extra_repr(self) -> str:
        return "n_experts={}, out_features={}, in_features={}, bits={}".format(
            self.weight.shape[0], self.out_features, self.in_features, self.bits)


# ---- the algorithms: one weight matrix [out, in] and its calibration inputs [N, in] ---------


@dataclass
class Quantized:
    packed: torch.Tensor  # packed codes [out, in * bits / 8]
    scale: torch.Tensor  # [out, n_groups] float32
    zero: torch.Tensor  # [out, n_groups]
    act_scale: torch.Tensor | None = None  # AWQ's s [in]


def _fake_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    scale, zero = grid_params(weight, bits, group_size)
    return from_codes(to_codes(weight, scale, zero, bits, group_size), scale, zero, group_size, torch.float32)


def rtn(weight: torch.Tensor, bits: int, group_size: int) -> Quantized:
    scale, zero = grid_params(weight, bits, group_size)
    return Quantized(pack_codes(to_codes(weight, scale, zero, bits, group_size), bits), scale, zero)


def gptq(weight: torch.Tensor, inputs: torch.Tensor, bits: int, group_size: int) -> Quantized:
    """GPTQ without act-order: columns in order, each group's grid fixed when its first column
    is reached (from the weights as updated so far), lazy updates every GPTQ_BLOCK columns."""
    if inputs.shape[0] == 0:  # an expert no calibration token was routed to
        return rtn(weight, bits, group_size)
    w = weight.detach().float().clone()
    x = inputs.float()
    hessian = 2 * x.T @ x / x.shape[0]
    dead = hessian.diagonal() == 0  # an input that is always 0: its weights do not matter
    hessian[dead, dead] = 1
    w[:, dead] = 0
    hessian.diagonal().add_(GPTQ_DAMP * hessian.diagonal().mean())
    # Upper Cholesky factor of H^-1: row i holds how column i's error spreads to columns > i.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)

    out_features, in_features = w.shape
    width = _group_width(in_features, group_size)
    scale = torch.empty(out_features, -(-in_features // width))
    zero = torch.empty_like(scale)
    rounded = torch.empty_like(w)
    top = 2**bits - 1
    for start in range(0, in_features, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, in_features)
        block, errors, hinv_block = w[:, start:end].clone(), torch.empty(out_features, end - start), hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % width == 0:
                group = torch.cat((block[:, i:], w[:, end:]), dim=1)[:, :width]
                s, z = grid_params(group, bits, 0)
                scale[:, col // width], zero[:, col // width] = s[:, 0], z[:, 0]
            s, z = scale[:, col // width], zero[:, col // width]
            q = ((torch.round(block[:, i] / s) + z).clamp(0, top) - z) * s
            rounded[:, col] = q
            errors[:, i] = (block[:, i] - q) / hinv_block[i, i]
            block[:, i:] -= errors[:, i, None] * hinv_block[i, i:]
        w[:, end:] -= errors @ hinv[start:end, end:]
    return Quantized(pack_codes(to_codes(rounded, scale, zero, bits, group_size), bits), scale, zero)


def awq(weight: torch.Tensor, inputs: torch.Tensor, bits: int, group_size: int) -> Quantized:
    """Search s = mean|x|^alpha (alpha on a grid of AWQ_GRID) minimising the layer's output
    error on the calibration inputs; alpha = 0 (s = 1) is plain RTN, so AWQ never does worse
    there."""
    w = weight.detach().float()
    if inputs.shape[0] == 0:
        return Quantized(**vars(rtn(w, bits, group_size)) | {"act_scale": torch.ones(w.shape[1])})
    x = inputs.float()
    magnitude = x.abs().mean(dim=0).clamp(min=1e-6)
    reference = x @ w.T
    best_error, best_s = float("inf"), None
    for k in range(AWQ_GRID):
        s = magnitude.pow(k / AWQ_GRID)
        s = s / (s.max() * s.min()).sqrt()  # keep the scales centred on 1
        error = (x @ (_fake_quantize(w * s, bits, group_size) / s).T - reference).pow(2).mean().item()
        if error < best_error:
            best_error, best_s = error, s
    result = rtn(w * best_s, bits, group_size)
    result.act_scale = best_s
    return result


# ---- calibration: the inputs each layer of one block sees ----------------------------------


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(part in name for part in skip)


def _keep(rows: list[torch.Tensor], new: torch.Tensor) -> None:
    """Append calibration rows [n, in] until MAX_CALIB_ROWS are held (float32, CPU)."""
    held = sum(r.shape[0] for r in rows)
    if held < MAX_CALIB_ROWS:
        rows.append(new.detach().reshape(-1, new.shape[-1])[: MAX_CALIB_ROWS - held].float().cpu())


def _expert_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.ndim == 3}


@torch.no_grad()
def _capture(model: nn.Module, block: nn.Module, prefix: str, skip: Sequence[str],
             batches: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Run the model on the calibration batches and keep, for each layer of `block` to be
    quantized, its inputs: "name" for a Linear, "name.e" for expert e of an MoE weight."""
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in block.named_modules():
        qualified = f"{prefix}.{name}" if name else prefix
        if isinstance(module, nn.Linear) and not _skipped(qualified, skip):
            rows = inputs.setdefault(name, [])
            hooks.append(module.register_forward_pre_hook(lambda m, args, rows=rows: _keep(rows, args[0])))
        experts = {n: p for n, p in _expert_weights(module).items() if not _skipped(f"{qualified}.{n}", skip)}
        if experts:
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: _keep_expert_inputs(m, args[0], name, inputs)))
    try:
        for batch in batches:
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def _keep_expert_inputs(moe: nn.Module, x: torch.Tensor, name: str, inputs: dict[str, list[torch.Tensor]]) -> None:
    """Route x as the MoE layer does (softmax top-k of its router) and keep each expert's
    tokens as the input of its gate/up weights, and the gated hidden state as that of down."""
    x = x.reshape(-1, x.shape[-1])
    chosen = moe.router(x).topk(moe.top_k, dim=-1).indices  # [N, k]
    act = getattr(moe, "act", F.silu)
    for e in range(moe.w_gate.shape[0]):
        tokens = x[(chosen == e).any(dim=-1)]
        hidden = act(F.linear(tokens, moe.w_gate[e])) * F.linear(tokens, moe.w_up[e])
        for weight, rows in (("w_gate", tokens), ("w_up", tokens), ("w_down", hidden)):
            _keep(inputs.setdefault(f"{name}.{weight}.{e}" if name else f"{weight}.{e}", []), rows)


def _quantize_matrix(weight: torch.Tensor, rows: list[torch.Tensor], cfg: QuantConfig) -> Quantized:
    if cfg.method == "rtn":
        return rtn(weight, cfg.bits, cfg.group_size)
    x = torch.cat(rows) if rows else torch.empty(0, weight.shape[-1])
    return (gptq if cfg.method == "gptq" else awq)(weight, x, cfg.bits, cfg.group_size)


# ---- whole models ---------------------------------------------------------------------------


def _replace_block(block: nn.Module, prefix: str, cfg: QuantConfig, inputs: dict[str, list[torch.Tensor]] | None):
    """Swap the block's Linear layers and expert weights for quantized ones; with `inputs`
    None, leave them empty (to be filled by load_state_dict)."""
    for name, module in list(block.named_modules()):
        qualified = f"{prefix}.{name}" if name else prefix
        for child_name, child in list(module.named_children()):
            key = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not _skipped(f"{qualified}.{child_name}", cfg.skip):
                new = QuantizedLinear.like(child, cfg)
                if inputs is not None:
                    new.load([_quantize_matrix(child.weight, inputs.get(key, []), cfg)])
                    if child.bias is not None:
                        new.bias.copy_(child.bias)
                setattr(module, child_name, new)
        for param_name, param in _expert_weights(module).items():
            if _skipped(f"{qualified}.{param_name}", cfg.skip):
                continue
            new = QuantizedExperts.like(param, cfg)
            if inputs is not None:
                key = f"{name}.{param_name}" if name else param_name
                new.load([_quantize_matrix(param[e], inputs.get(f"{key}.{e}", []), cfg) for e in range(param.shape[0])])
            delattr(module, param_name)
            setattr(module, param_name, new)


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks, or (for any other module) the module itself as one block."""
    layers = getattr(model, "layers", None)
    return [(f"layers.{i}", b) for i, b in enumerate(layers)] if isinstance(layers, nn.ModuleList) else [("", model)]


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: QuantConfig, calibration: Iterable[torch.Tensor] = ()) -> nn.Module:
    """Quantize `model` in place, block by block; `calibration` is a few batches of token ids
    [B, T] (needed by gptq and awq). The config is recorded as `model.quantization`."""
    cfg.validate()
    batches = list(calibration)
    if cfg.method != "rtn" and not batches:
        raise ValueError(f"{cfg.method} needs calibration batches")
    was_training = model.training
    model.eval()
    for prefix, block in _blocks(model):
        inputs = _capture(model, block, prefix, cfg.skip, batches) if cfg.method != "rtn" else {}
        _replace_block(block, prefix, cfg, inputs)
    model.train(was_training)
    model.quantization = cfg.to_dict()
    return model


def state_dict_bytes(model: nn.Module) -> int:
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
    """Write a model quantized by quantize_model as a model directory (atomically).
    `model_config_dict` defaults to model.cfg.to_dict(); `extra` adds keys to config.json."""
    quantization = getattr(model, "quantization", None)
    if quantization is None:
        raise ValueError("the model is not quantized; call quantize_model(model, ...) before save_quantized")
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
    try:
        cfg = QuantConfig.from_dict(config["quantization"])
        cfg.validate()
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path / CONFIG_FILE}: unreadable quantization settings ({err}); re-run llm quantize") from None
    model = Decoder(ModelConfig.from_dict(config["model"]))
    for prefix, block in _blocks(model):
        _replace_block(block, prefix, cfg, None)
    model.quantization = cfg.to_dict()
    load_model(model, str(path / WEIGHTS_FILE), strict=True, device=str(device))
    model.to(device)
    tokenizer_file = path / TOKENIZER_FILE
    tokenizer = Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file.is_file() else None
    return model.eval(), tokenizer
