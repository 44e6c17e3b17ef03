"""Quantize: int8 weight-only, per output channel; reports size and perplexity change."""

from __future__ import annotations

from llm_lifecycle.workflows.model_stage import heldout_perplexity, load_upstream_model
from llm_lifecycle.workflows.stage import StageContext, StageResult, UserError


def run(ctx: StageContext, cfg: dict) -> StageResult:
    from llm_lifecycle.models.quantize import int8_state_dict_size_bytes, quantize_int8, save_quantized

    if cfg["method"] != "int8":
        raise UserError(f"stages.quantize.method: '{cfg['method']}' is not available; use int8")
    model, tokenizer, _ = load_upstream_model(ctx, "rl")
    seq_len = ctx.recipe.stages["pretrain"]["seq_len"]
    size_before = int8_state_dict_size_bytes(model)
    ppl_before = heldout_perplexity(ctx, model, seq_len, cfg["eval_windows"])
    quantize_int8(model.cpu())
    size_after = int8_state_dict_size_bytes(model)
    ppl_after = heldout_perplexity(ctx, model, seq_len, cfg["eval_windows"])
    out = ctx.stage_dir / "model"
    save_quantized(out, model, tokenizer, model.cfg.to_dict())
    metrics = {"size_mb_before": size_before / 2**20, "size_mb_after": size_after / 2**20,
               "compression": size_before / size_after, "ppl_before": ppl_before, "ppl_after": ppl_after,
               "ppl_change_pct": 100 * (ppl_after - ppl_before) / ppl_before}
    return StageResult(outputs={"model": str(out)}, metrics=metrics, model_dir=str(out))
