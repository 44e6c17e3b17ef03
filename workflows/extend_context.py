"""Extend context: raise the RoPE base (optionally with NTK-aware / YaRN / linear scaling) and
continue training at a longer sequence length, as the Qwen and LLaMA reports do.

Perplexity is measured at the original and the extended length, before and after, so the
effect of each method can be compared across recipes.
"""

from __future__ import annotations

import dataclasses

from llm_lifecycle.workflows.model_stage import heldout_perplexity, load_upstream_model, save_stage_model
from llm_lifecycle.workflows.stage import StageContext, StageResult, UserError
from llm_lifecycle.workflows.trainer import TrainSettings, lm_loss, train


def run(ctx: StageContext, cfg: dict) -> StageResult:
    from llm_lifecycle.models.decoder import Decoder
    from llm_lifecycle.workflows.shards import TokenShards

    settings = TrainSettings.from_cfg(cfg)
    base, tokenizer, _ = load_upstream_model(ctx, "pretrain")
    short_len = ctx.recipe.stages["pretrain"]["seq_len"]
    long_len = settings.seq_len
    if long_len <= short_len:
        raise UserError(
            f"recipe {ctx.recipe.name}: stages.extend-context.seq_len ({long_len}) must exceed "
            f"pretrain.seq_len ({short_len})"
        )
    windows = cfg["eval_windows"]
    metrics = {
        f"ppl_before_{short_len}": heldout_perplexity(ctx, base, short_len, windows),
        f"ppl_before_{long_len}": _ppl_beyond_trained_length(ctx, base, long_len, windows),
    }
    scaling = cfg["rope_scaling"]
    if scaling is not None:
        scaling = {"original_max_seq_len": short_len, **scaling}
    long_cfg = dataclasses.replace(
        base.cfg, rope_theta=float(cfg["rope_theta"]), rope_scaling=scaling, max_seq_len=long_len
    )
    model = Decoder(long_cfg)
    model.load_state_dict(base.state_dict())
    del base
    shards = TokenShards(ctx.upstream_output("tokenize", "train"))

    def batches(start: int):
        return shards.batches(settings.batch_size, long_len, seed=ctx.seed + 1, start_step=start)

    summary = train(
        ctx, model, settings, batches, lm_loss,
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=long_cfg.flops_per_token(long_len),
        description="extend-context",
    )
    metrics.update(summary)
    metrics[f"ppl_after_{short_len}"] = heldout_perplexity(ctx, model, short_len, windows)
    metrics[f"ppl_after_{long_len}"] = heldout_perplexity(ctx, model, long_len, windows)
    model_dir = save_stage_model(ctx, model, tokenizer)
    return StageResult(outputs={"model": str(model_dir)}, metrics=metrics, model_dir=str(model_dir))


def _ppl_beyond_trained_length(ctx: StageContext, model, seq_len: int, windows: int) -> float:
    """The pretrained model evaluated past its trained length (RoPE extrapolates; it is the baseline)."""
    from llm_lifecycle.models.decoder import Decoder

    if model.cfg.max_seq_len >= seq_len:
        return heldout_perplexity(ctx, model, seq_len, windows)
    stretched = Decoder(dataclasses.replace(model.cfg, max_seq_len=seq_len))
    stretched.load_state_dict(model.state_dict())
    return heldout_perplexity(ctx, stretched, seq_len, windows)
