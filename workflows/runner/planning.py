"""Memory plans: `llm plan PRESET|--params 7B` and the estimate `--dry-run` prints, with a
warning when a stage will not fit this machine."""

from __future__ import annotations

import re

from llm_lifecycle.workflows.engine.memory import (
    ModelShape, format_bytes, gpus_needed, inference_memory, lora_training_memory, training_memory,
)
from llm_lifecycle.workflows.runner.recipe import Recipe
from llm_lifecycle.workflows.runner.stage import UserError

TRAINING_PRECISIONS = ("fp32", "bf16")
INFERENCE_PRECISIONS = ("fp32", "fp16", "int8", "int4")
# GPUs a plan can be sized for: (memory in bytes, dense bf16 peak FLOP/s from the trainer's table).
GPU_MEMORY_GIB = {"H100": 80, "H200": 141, "A100": 80, "A100-40GB": 40, "L4": 24, "A10": 24, "4090": 24}


def shape_of(cfg) -> ModelShape:
    """The numbers the planner needs from a models.config.ModelConfig."""
    return ModelShape(
        params=cfg.num_params(), vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers,
        n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, ffn_dim=cfg.ffn_dim,
        n_experts=cfg.n_experts, experts_per_token=cfg.n_experts_per_token if cfg.is_moe else 0,
        moe_ffn_dim=cfg.moe_ffn_dim if cfg.is_moe else 0, n_shared_experts=cfg.n_shared_experts if cfg.is_moe else 0,
        n_dense_layers=cfg.n_dense_layers if cfg.is_moe else 0, qk_norm=cfg.qk_norm, gated_mlp=cfg.mlp != "gelu",
        parallel_block=cfg.parallel_block, fused_loss=cfg.fused_loss_applies, tie_embeddings=cfg.tie_embeddings,
        latent_kv_dim=cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.is_mla else 0,
        layer_windows=tuple(cfg.layer_windows()), materialised_scores=cfg.dca_chunk is not None, gegelu=cfg.mlp == "gegelu",
        block_sparse_layers=sum(map(cfg.is_block_sparse_layer, range(cfg.n_layers))),
        block_sparse_mask_heads=1 if cfg.blocksparse_homo_heads else cfg.n_heads,
    )


def parse_params(text: str, option: str = "--params") -> float:
    """'7B' -> 7e9, '500M' -> 5e8, '1.5b' -> 1.5e9, '2T' -> 2e12."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBtT]?)\s*", text)
    if not m:
        raise UserError(f"{option} {text!r}: expected a count like 7B, 500M or 1.5T")
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


def dense_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Training FLOPs per token of a model known only by its size (--params): 6 N + 12 L H Q T,
    as ModelConfig.flops_per_token counts a preset."""
    return 6.0 * shape.params + 12.0 * shape.n_layers * shape.n_heads * shape.head_dim * seq_len


def gpu_spec(name: str) -> tuple[float, float]:
    """(memory bytes, dense bf16 peak FLOP/s) of a GPU named in GPU_MEMORY_GIB."""
    from llm_lifecycle.workflows.engine.trainer import GPU_PEAK_FLOPS

    if name not in GPU_MEMORY_GIB:
        raise UserError(f"--gpu {name!r}: not one of {', '.join(GPU_MEMORY_GIB)}; or give --gpu-memory GIB")
    return GPU_MEMORY_GIB[name] * 2**30, GPU_PEAK_FLOPS[name.split("-")[0]]


def plan_rows(shape: ModelShape, batch_size: int, seq_len: int, lora_rank: int,
              recompute: bool = False) -> list[tuple[str, str, dict[str, float]]]:
    """(what, precision, byte breakdown) for training, LoRA/QLoRA fine-tuning and inference
    at this batch shape; `recompute`: the training rows with activation checkpointing."""
    rows = [("train (AdamW)", p, training_memory(shape, batch_size, seq_len, p, recompute)) for p in TRAINING_PRECISIONS]
    rows += [(f"{name} r{lora_rank}", base, lora_training_memory(shape, batch_size, seq_len, lora_rank, quantized, recompute))
             for name, base, quantized in (("LoRA", "bf16 base", False), ("QLoRA", "nf4 base", True))]
    rows += [("inference", p, inference_memory(shape, batch_size, seq_len, p)) for p in INFERENCE_PRECISIONS]
    return rows


def gpu_column(rows: list[tuple[str, str, dict[str, float]]], gpu_bytes: float) -> list[str]:
    """Each row's GPU count (FSDP for training, tensor parallel for inference), or why none."""
    counts = [gpus_needed(est, gpu_bytes) for _, _, est in rows]
    return [str(n) if n is not None else "-*" for n in counts]


def available_memory() -> tuple[str, int]:
    """(what, bytes) this machine offers: the first GPU's memory, else available RAM."""
    import psutil
    import torch

    if torch.cuda.is_available():
        return "GPU memory", torch.cuda.get_device_properties(0).total_memory
    return "RAM", psutil.virtual_memory().available


def stage_estimates(recipe: Recipe) -> dict[str, tuple[float, dict[str, float]]]:
    """Each training stage's estimated peak bytes on this machine and its breakdown."""
    from llm_lifecycle.models.config import ModelConfig
    from llm_lifecycle.workflows.engine.distributed import device
    from llm_lifecycle.workflows.engine.trainer import resolve_precision

    estimates = {}
    for stage, inst in recipe.instances.items():
        if not inst.spec.trains:
            continue
        s = inst.settings
        precision = resolve_precision(s.precision, device())
        est = training_memory(shape_of(ModelConfig.from_dict(inst.values["model"])), s.batch_size, s.seq_len, precision)
        need = est["total"] + (est["weights"] if inst.kind == "rl" else 0)  # DPO holds a frozen reference copy
        estimates[stage] = need, est
    return estimates


def memory_report(recipe: Recipe) -> list[str]:
    """One line per training stage: its estimated peak and whether it fits this machine."""
    cfg = recipe.model_config()
    lines = [f"model: {recipe.preset}, {cfg.num_params() / 1e6:.2f}M parameters "
             f"({cfg.active_params() / 1e6:.2f}M active per token)"]
    where, available = available_memory()
    for stage, (need, est) in stage_estimates(recipe).items():
        verdict = "fits" if need < available else f"[bold red]will not fit[/bold red] in {format_bytes(available)} {where}"
        lines.append(f"memory estimate {stage}: {format_bytes(need)} ({_breakdown(est)}) — {verdict}")
    return lines


def refuse_what_cannot_fit(recipe: Recipe, stages: list[str]) -> None:
    """Before any run opens: a training stage whose estimated peak exceeds the memory this
    machine has free is refused, instead of being killed by the kernel part-way."""
    where, available = available_memory()
    for stage, (need, est) in stage_estimates(recipe).items():
        if stage in stages and need > available:
            raise UserError(
                f"{stage}: needs about {format_bytes(need)} of memory ({_breakdown(est)}), but {format_bytes(available)} "
                f"{where} is available; lower stages.{stage}.batch_size or seq_len, or choose a smaller model "
                f"(see `llm pipeline {recipe.name} --dry-run`)"
            )


def _breakdown(est: dict[str, float]) -> str:
    return (f"weights {format_bytes(est['weights'])}, optimizer {format_bytes(est['optimizer'])}, "
            f"activations {format_bytes(est['activations'])}")
