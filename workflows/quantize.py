"""Quantize: weight-only RTN, GPTQ or AWQ at 8 or 4 bits; reports size and perplexity change
and registers the result as `models:/<recipe>@int<bits>`."""

from __future__ import annotations

import numpy as np
import torch

from llm_lifecycle.workflows.model_stage import heldout_perplexity, load_upstream_model
from llm_lifecycle.workflows.stage import StageContext, StageResult, UserError


def quant_config(cfg: dict):
    from llm_lifecycle.models.quantize import QuantConfig

    qcfg = QuantConfig(method=cfg["method"], bits=cfg["bits"], group_size=cfg["group_size"])
    try:
        qcfg.validate()
    except ValueError as err:
        raise UserError(f"stages.quantize: {err}") from None
    return qcfg


def calibration_batches(tokens, seq_len: int, windows: int, seed: int, batch_size: int = 8) -> list[torch.Tensor]:
    """`windows` random windows of `tokens` (training text, not the held-out text perplexity
    is measured on), drawn with `seed`, in batches."""
    if len(tokens) <= seq_len:
        raise UserError(f"the training text has {len(tokens)} tokens, fewer than one calibration window of {seq_len}")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seq_len, size=windows)
    rows = torch.stack([torch.as_tensor(tokens[s : s + seq_len].astype("int64")) for s in starts])
    return list(rows.split(batch_size))


def run(ctx: StageContext, cfg: dict) -> StageResult:
    from llm_lifecycle.models.quantize import quantize_model, save_quantized, state_dict_bytes
    from llm_lifecycle.workflows.shards import TokenShards

    qcfg = quant_config(cfg)
    model, tokenizer, _ = load_upstream_model(ctx, "rl")
    model = model.cpu()
    seq_len = ctx.recipe.stages["pretrain"]["seq_len"]
    size_before = state_dict_bytes(model)
    ppl_before = heldout_perplexity(ctx, model, seq_len, cfg["eval_windows"])
    calibration = []
    if qcfg.method != "rtn":
        train = TokenShards(ctx.upstream_output("tokenize", "train")).tokens
        calibration = calibration_batches(train, seq_len, cfg["calib_windows"], ctx.seed)
    with ctx.progress.task(f"{qcfg.method} int{qcfg.bits} (group {qcfg.group_size})", total=None):
        quantize_model(model, qcfg, calibration)
    size_after = state_dict_bytes(model)
    ppl_after = heldout_perplexity(ctx, model, seq_len, cfg["eval_windows"])
    out = ctx.stage_dir / "model"
    save_quantized(out, model, tokenizer, model.cfg.to_dict(), extra={"stage": ctx.stage, "recipe": ctx.recipe.name})
    metrics = {"size_mb_before": size_before / 2**20, "size_mb_after": size_after / 2**20,
               "compression": size_before / size_after, "ppl_before": ppl_before, "ppl_after": ppl_after,
               "ppl_change_pct": 100 * (ppl_after - ppl_before) / ppl_before}
    return StageResult(outputs={"model": str(out)}, metrics=metrics, model_dir=str(out), model_alias=f"int{qcfg.bits}")
