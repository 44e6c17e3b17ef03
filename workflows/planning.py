"""The memory estimate `--dry-run` prints, with a warning when it will not fit this machine."""

from __future__ import annotations

from llm_lifecycle.workflows.recipe import Recipe


def _available_bytes() -> tuple[str, int]:
    import psutil
    import torch

    if torch.cuda.is_available():
        return "GPU memory", torch.cuda.get_device_properties(0).total_memory
    return "RAM", psutil.virtual_memory().available


def memory_report(recipe: Recipe) -> list[str]:
    from llm_lifecycle.models.config import estimate_memory, format_bytes

    cfg = recipe.model_config()
    lines = [f"model: {recipe.preset}, {cfg.num_params() / 1e6:.2f}M parameters "
             f"({cfg.active_params() / 1e6:.2f}M active per token)"]
    where, available = _available_bytes()
    for stage in ("pretrain", "extend-context", "sft", "rl"):
        s = recipe.stages[stage]
        est = estimate_memory(cfg, s["batch_size"], s["seq_len"], dtype_bytes=4)
        need = est["train_total"] * (2 if stage == "rl" else 1)  # DPO holds a reference copy
        verdict = "fits" if need < available else f"[bold red]will not fit[/bold red] in {format_bytes(available)} {where}"
        lines.append(f"memory estimate {stage}: {format_bytes(need)} (weights {format_bytes(est['weights'])}, "
                     f"optimizer {format_bytes(est['optimizer'])}, activations {format_bytes(est['activations'])}) — {verdict}")
    return lines
