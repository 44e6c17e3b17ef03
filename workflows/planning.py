"""Memory plans: `llm plan PRESET|--params 7B` and the estimate `--dry-run` prints, with a
warning when a stage will not fit this machine."""

from __future__ import annotations

import re

from llm_lifecycle.registry.memory import ModelShape, format_bytes, inference_memory, training_memory
from llm_lifecycle.workflows.recipe import Recipe
from llm_lifecycle.workflows.stage import UserError

TRAINING_PRECISIONS = ("fp32", "bf16")
INFERENCE_PRECISIONS = ("fp32", "fp16", "int8", "int4")


def shape_of(cfg) -> ModelShape:
    """The numbers the planner needs from a models.config.ModelConfig."""
    return ModelShape(
        params=cfg.num_params(), vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers,
        n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, ffn_dim=cfg.ffn_dim,
        n_experts=cfg.n_experts, experts_per_token=cfg.n_experts_per_token if cfg.is_moe else 0,
        moe_ffn_dim=cfg.moe_ffn_dim if cfg.is_moe else 0, n_shared_experts=cfg.n_shared_experts if cfg.is_moe else 0,
        n_dense_layers=cfg.n_dense_layers if cfg.is_moe else 0, qk_norm=cfg.qk_norm, gated_mlp=cfg.mlp != "gelu",
        parallel_block=cfg.parallel_block, fused_loss=not cfg.max_z_loss_coef,
        latent_kv_dim=cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.is_mla else 0,
    )


def parse_params(text: str) -> float:
    """'7B' -> 7e9, '500M' -> 5e8, '1.5b' -> 1.5e9."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBtT]?)\s*", text)
    if not m:
        raise UserError(f"--params {text!r}: expected a count like 7B, 500M or 1.5e9")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]


def shape_for_params(n: float, vocab_size: int = 32_000) -> ModelShape:
    """A LLaMA-shaped dense model of about `n` parameters: head size 128, one layer per 128
    of width (LLaMA 7B: width 4096, 32 layers), SwiGLU hidden 8/3 width, untied head."""
    if n < 1e6:
        raise UserError(f"--params {n:.0f}: plan models of at least 1M parameters")
    dim = 128
    while _llama_params(dim + 128, vocab_size) <= n:
        dim += 128
    layers = max(1, dim // 128)
    ffn = int(round(8 * dim / 3 / 256)) * 256 or 256
    return ModelShape(params=int(n), vocab_size=vocab_size, dim=dim, n_layers=layers, n_heads=dim // 128,
                      n_kv_heads=dim // 128, head_dim=128, ffn_dim=ffn)


def _llama_params(dim: int, vocab: int) -> float:
    return (dim // 128) * (4 * dim * dim + 3 * dim * int(8 * dim / 3)) + 2 * vocab * dim


def plan_rows(shape: ModelShape, batch_size: int, seq_len: int) -> list[tuple[str, str, dict[str, float]]]:
    """(what, precision, byte breakdown) for training and inference at this batch shape."""
    rows = [("train (AdamW)", p, training_memory(shape, batch_size, seq_len, p)) for p in TRAINING_PRECISIONS]
    rows += [("inference", p, inference_memory(shape, batch_size, seq_len, p)) for p in INFERENCE_PRECISIONS]
    return rows


def available_memory() -> tuple[str, int]:
    """(what, bytes) this machine offers: the first GPU's memory, else available RAM."""
    import psutil
    import torch

    if torch.cuda.is_available():
        return "GPU memory", torch.cuda.get_device_properties(0).total_memory
    return "RAM", psutil.virtual_memory().available


def memory_report(recipe: Recipe) -> list[str]:
    """One line per training stage: its estimated peak and whether it fits this machine."""
    from llm_lifecycle.workflows.distributed import device
    from llm_lifecycle.workflows.trainer import resolve_precision

    cfg = recipe.model_config()
    shape = shape_of(cfg)
    lines = [f"model: {recipe.preset}, {cfg.num_params() / 1e6:.2f}M parameters "
             f"({cfg.active_params() / 1e6:.2f}M active per token)"]
    where, available = available_memory()
    for stage in ("pretrain", "extend-context", "sft", "rl"):
        s = recipe.stages[stage]
        precision = resolve_precision(s["precision"], device())
        est = training_memory(shape, s["batch_size"], s["seq_len"], precision)
        need = est["total"] + (est["weights"] if stage == "rl" else 0)  # DPO holds a frozen reference copy
        verdict = "fits" if need < available else f"[bold red]will not fit[/bold red] in {format_bytes(available)} {where}"
        lines.append(f"memory estimate {stage}: {format_bytes(need)} (weights {format_bytes(est['weights'])}, "
                     f"optimizer {format_bytes(est['optimizer'])}, activations {format_bytes(est['activations'])}) "
                     f"— {verdict}")
    return lines
