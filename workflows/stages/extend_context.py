"""Extend context: raise the RoPE base (optionally with position interpolation, NTK-aware,
dynamic NTK, YaRN or Llama 3.1 scaling, and LogN attention scaling) and continue training at
a longer sequence length, as the Qwen and LLaMA reports do.

Perplexity at several lengths (the original, the extended, and beyond) and a passkey-
retrieval probe at the extended length are measured before and after, so the effect of each
method can be compared across recipes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llm_lifecycle.workflows.data.mixture import parse_schedule, scheduled_batches
from llm_lifecycle.workflows.engine.model_stage import heldout_perplexity, load_input_model, save_stage_model
from llm_lifecycle.workflows.engine.trainer import TrainSettings, lm_loss, train
from llm_lifecycle.workflows.runner.settings import AT_LEAST_1, NON_NEGATIVE, POSITIVE, ConfigError, setting, with_defaults
from llm_lifecycle.workflows.runner.stage import Port, StageContext, StageKind, StageResult


@dataclass
class ExtendContextSettings(with_defaults(TrainSettings, seq_len=512, lr=3e-4, warmup_steps=5)):
    steps: int = setting(40, "optimizer steps; 0: the method training-free (Dual Chunk Attention's design, or "
                             "any scaling untrained), measured and registered as is", limit=NON_NEGATIVE)
    rope_theta: float = setting(100_000.0, "the new RoPE base", limit=POSITIVE)
    rope_scaling: dict | None = setting(None, "e.g. {type: yarn, factor: 2.0}; types: linear, ntk, dynamic, yarn, llama3, "
                                              "longrope (its short_factor/long_factor lists given, or derived from "
                                              "YaRN's ramp when left out)")
    logn: bool = setting(False, "LogN attention scaling past the trained length (Qwen)")
    dca_chunk: int | None = setting(None, "Dual Chunk Attention (Qwen2.5-1M): chunks of this many tokens (e.g. 3/4 "
                                          "of the trained length); null: off", limit=AT_LEAST_1)
    dca_local_window: int | None = setting(None, "DCA's local window (keys of the previous chunk at their true "
                                                 "distance); null: the trained length - dca_chunk, at most dca_chunk",
                                           limit=NON_NEGATIVE)
    eval_windows: int = setting(16, "held-out windows per perplexity length", limit=AT_LEAST_1)
    eval_lengths: list[int] | None = setting(None, "perplexity at these lengths too (default: twice seq_len)")
    passkey_trials: int = setting(8, "passkey-retrieval probe at seq_len (0: off)", limit=NON_NEGATIVE)
    schedule: list[Any] = setting([], "data phases, e.g. [{until: 1.0, mixture: {long: 0.7, general: 0.3}, "
                                      "min_doc_tokens: 512}] (docs/data.md)")

    def long_model(self, upstream: dict[str, Any]) -> dict[str, Any]:
        """The model's config fields after the extension (the input's length is the original)."""
        from llm_lifecycle.models.config import ModelConfig
        from llm_lifecycle.models.decoder import yarn_as_longrope

        trained = upstream["seq_len"]
        fields = {**upstream["model"], "rope_theta": float(self.rope_theta), "max_seq_len": self.seq_len}
        scaling = self.rope_scaling
        if scaling is not None:
            scaling = {"original_max_seq_len": trained, **scaling}
            if scaling.get("type") == "longrope" and "short_factor" not in scaling and "long_factor" not in scaling:
                scaling.update(yarn_as_longrope(ModelConfig.from_dict(fields), float(scaling.get("factor", 1.0)),
                                                scaling["original_max_seq_len"]))
        fields["rope_scaling"] = scaling
        if self.dca_chunk is not None:
            window = self.dca_local_window
            fields.update(dca_chunk=self.dca_chunk,
                          dca_local_window=max(0, min(trained - self.dca_chunk, self.dca_chunk)) if window is None else window)
        elif self.dca_local_window is not None:
            fields["dca_local_window"] = self.dca_local_window  # validate() says it needs dca_chunk
        return fields

    def check(self, where: str, upstream: dict[str, Any]) -> None:
        from llm_lifecycle.models.config import ModelConfig

        if self.seq_len <= upstream["seq_len"]:
            raise ConfigError(f"{where}.seq_len ({self.seq_len}) must exceed the length its model was trained at "
                              f"({upstream['seq_len']})")
        given = [k for k in ("short_factor", "long_factor") if isinstance(self.rope_scaling, dict) and k in self.rope_scaling]
        if len(given) == 1:
            raise ConfigError(f"{where}.rope_scaling: give both short_factor and long_factor, or neither (then they "
                              "are derived from YaRN's ramp)")
        if self.dca_chunk is not None and self.dca_chunk + (self.dca_local_window or 0) > upstream["seq_len"]:
            raise ConfigError(f"{where}.dca_chunk + dca_local_window ({self.dca_chunk + (self.dca_local_window or 0)}) must "
                              f"not exceed the length its model was trained at ({upstream['seq_len']}): DCA keeps every "
                              "distance within it")
        if self.eval_lengths is not None and not all(v >= 2 for v in self.eval_lengths):
            raise ConfigError(f"{where}.eval_lengths: expected a list of integers >= 2, got {self.eval_lengths!r}")
        try:
            ModelConfig.from_dict(self.long_model(upstream)).validate()
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{where}: {err}") from None

    def passes_on(self, upstream: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.long_model(upstream), "seq_len": self.seq_len}


def run(ctx: StageContext, cfg: ExtendContextSettings) -> StageResult:
    from llm_lifecycle.models.decoder import Decoder
    from llm_lifecycle.workflows.data.shards import TokenShards

    schedule = parse_schedule(cfg.schedule, f"stages.{ctx.stage}.schedule")
    base, tokenizer, _ = load_input_model(ctx)
    short_len, long_len = ctx.values["seq_len"], cfg.seq_len
    windows = cfg.eval_windows
    lengths = sorted({short_len, long_len, *(cfg.eval_lengths or [2 * long_len])})
    metrics = _long_context_metrics(ctx, base, tokenizer, lengths, long_len, windows, cfg.passkey_trials, "before")
    extended = cfg.long_model({"seq_len": short_len, "model": base.cfg.to_dict()})
    long_cfg = dataclasses.replace(
        base.cfg, **{k: extended[k] for k in ("rope_theta", "rope_scaling", "max_seq_len", "dca_chunk", "dca_local_window")},
        logn_train_len=short_len if cfg.logn else base.cfg.logn_train_len,
    )
    model = Decoder(long_cfg)
    model.load_state_dict(base.state_dict())
    del base
    shards = TokenShards(ctx.input_path("shards", "train"))

    def batches(start: int):
        return scheduled_batches(shards, schedule, cfg, seed=ctx.seed + 1, start_micro_step=start)

    summary = train(
        ctx, model, cfg, batches, lm_loss,
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=long_cfg.flops_per_token(long_len),
        description=ctx.stage,
    ) if cfg.steps else {}
    metrics.update(summary, seq_len=long_len)  # the length whose perplexity the stage is meant to lower
    metrics.update(_long_context_metrics(ctx, model, tokenizer, lengths, long_len, windows, cfg.passkey_trials, "after"))
    model_dir = save_stage_model(ctx, model, tokenizer)
    return StageResult(outputs={"model": str(model_dir)}, metrics=metrics, model_dir=str(model_dir))


def _long_context_metrics(ctx, model, tokenizer, lengths, long_len, windows, trials, when) -> dict[str, float]:
    """ppl_{when}_{L} for each length the held-out text covers, and the passkey probe."""
    from llm_lifecycle.evals.passkey import passkey_retrieval
    from llm_lifecycle.workflows.data.shards import TokenShards

    heldout = TokenShards(ctx.input_path("shards", "heldout"))
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


KIND = StageKind("extend-context", ExtendContextSettings, run,
                 inputs=(Port("model", "model"), Port("shards", "shards")), output="model", trains=True)
