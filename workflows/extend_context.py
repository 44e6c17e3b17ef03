"""Extend context: raise the RoPE base (optionally with position interpolation, NTK-aware,
dynamic NTK, YaRN or Llama 3.1 scaling, and LogN attention scaling) and continue training at
a longer sequence length, as the Qwen and LLaMA reports do.

Perplexity at several lengths (the original, the extended, and beyond) and a passkey-
retrieval probe at the extended length are measured before and after, so the effect of each
method can be compared across recipes.
"""

from __future__ import annotations

import dataclasses

from llm_lifecycle.workflows.mixture import parse_schedule, scheduled_batches
from llm_lifecycle.workflows.model_stage import heldout_perplexity, load_upstream_model, save_stage_model
from llm_lifecycle.workflows.stage import StageContext, StageResult, UserError
from llm_lifecycle.workflows.trainer import TrainSettings, lm_loss, train


def run(ctx: StageContext, cfg: dict) -> StageResult:
    from llm_lifecycle.models.decoder import Decoder
    from llm_lifecycle.workflows.shards import TokenShards

    settings = TrainSettings.from_cfg(cfg)
    schedule = parse_schedule(cfg["schedule"], "stages.extend-context.schedule")
    base, tokenizer, _ = load_upstream_model(ctx, "pretrain")
    short_len = ctx.recipe.stages["pretrain"]["seq_len"]
    long_len = settings.seq_len
    if long_len <= short_len:
        raise UserError(
            f"recipe {ctx.recipe.name}: stages.extend-context.seq_len ({long_len}) must exceed "
            f"pretrain.seq_len ({short_len})"
        )
    windows = cfg["eval_windows"]
    lengths = sorted({short_len, long_len, *(cfg["eval_lengths"] or [2 * long_len])})
    metrics = _long_context_metrics(ctx, base, tokenizer, lengths, long_len, windows, cfg["passkey_trials"], "before")
    scaling = cfg["rope_scaling"]
    if scaling is not None:
        scaling = {"original_max_seq_len": short_len, **scaling}
    long_cfg = dataclasses.replace(
        base.cfg, rope_theta=float(cfg["rope_theta"]), rope_scaling=scaling, max_seq_len=long_len,
        logn_train_len=short_len if cfg["logn"] else base.cfg.logn_train_len,
    )
    model = Decoder(long_cfg)
    model.load_state_dict(base.state_dict())
    del base
    shards = TokenShards(ctx.upstream_output("tokenize", "train"))

    def batches(start: int):
        return scheduled_batches(shards, schedule, settings, seed=ctx.seed + 1, start_micro_step=start)

    summary = train(
        ctx, model, settings, batches, lm_loss,
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=long_cfg.flops_per_token(long_len),
        description="extend-context",
    )
    metrics.update(summary, seq_len=long_len)  # the length whose perplexity the stage is meant to lower
    metrics.update(_long_context_metrics(ctx, model, tokenizer, lengths, long_len, windows, cfg["passkey_trials"], "after"))
    model_dir = save_stage_model(ctx, model, tokenizer)
    return StageResult(outputs={"model": str(model_dir)}, metrics=metrics, model_dir=str(model_dir))


def _long_context_metrics(ctx, model, tokenizer, lengths, long_len, windows, trials, when) -> dict[str, float]:
    """ppl_{when}_{L} for each length the held-out text covers, and the passkey probe."""
    from llm_lifecycle.evals.passkey import passkey_retrieval
    from llm_lifecycle.workflows.shards import TokenShards

    heldout = TokenShards(ctx.upstream_output("tokenize", "heldout"))
    metrics = {}
    for length in lengths:
        if len(heldout) < length + 1:
            ctx.progress.log(f"  [dim]no perplexity at {length}: held-out text has {len(heldout)} tokens[/dim]")
            continue
        metrics[f"ppl_{when}_{length}"] = heldout_perplexity(ctx, _stretched(model, length), length, windows)
    if trials:
        filler = [int(t) for t in heldout.tokens[: 4 * long_len]]
        try:
            probe = passkey_retrieval(_stretched(model, long_len), lambda text: tokenizer.encode(text).ids, filler,
                                      long_len, trials=trials, seed=ctx.seed)
        except ValueError as err:
            ctx.progress.log(f"  [dim]no passkey probe: {err}[/dim]")
        else:
            metrics.update({f"passkey_{when}_{long_len}.{k}": v for k, v in probe.items()})
    return metrics


def _stretched(model, seq_len: int):
    """The model allowed to run at seq_len (past its trained length RoPE extrapolates: the baseline)."""
    from llm_lifecycle.models.decoder import Decoder

    if model.cfg.max_seq_len >= seq_len:
        return model
    stretched = Decoder(dataclasses.replace(model.cfg, max_seq_len=seq_len))
    stretched.load_state_dict(model.state_dict())
    return stretched.to(next(model.parameters()).device)
