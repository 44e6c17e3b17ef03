"""Quantize: weight-only RTN, GPTQ or AWQ at 8 or 4 bits; reports size and perplexity change
and registers the result as `models:/<recipe>@int<bits>`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llm_lifecycle.models.quantize import BITS, METHODS, QuantConfig
from llm_lifecycle.workflows.engine.model_stage import heldout_perplexity, load_input_model, model_provenance
from llm_lifecycle.workflows.runner.settings import AT_LEAST_1, NON_NEGATIVE, ConfigError, Settings, setting
from llm_lifecycle.workflows.runner.stage import Port, StageContext, StageKind, StageResult, UserError


@dataclass
class QuantizeSettings(Settings):
    method: str = setting("rtn", "rtn: round to nearest; gptq; awq (weight-only)", choices=METHODS)
    bits: int = setting(8, "weight bits", choices=BITS)
    group_size: int = setting(128, "weights per scale; 0: one scale per output row", limit=NON_NEGATIVE)
    calib_windows: int = setting(32, "training-text windows that calibrate gptq and awq", limit=AT_LEAST_1)
    eval_windows: int = setting(32, "held-out windows for the perplexity before and after", limit=AT_LEAST_1)

    def quant_config(self) -> QuantConfig:
        return QuantConfig(method=self.method, bits=self.bits, group_size=self.group_size)

    def check(self, where: str, upstream: dict) -> None:
        try:
            self.quant_config().validate()
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None


def calibration_batches(tokens, seq_len: int, windows: int, seed: int, batch_size: int = 8) -> list[torch.Tensor]:
    """`windows` random windows of `tokens` (training text, not the held-out text perplexity
    is measured on), drawn with `seed`, in batches."""
    if len(tokens) <= seq_len:
        raise UserError(f"the training text has {len(tokens)} tokens, fewer than one calibration window of {seq_len}")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seq_len, size=windows)
    rows = torch.stack([torch.as_tensor(tokens[s : s + seq_len].astype("int64")) for s in starts])
    return list(rows.split(batch_size))


def run(ctx: StageContext, cfg: QuantizeSettings) -> StageResult:
    from llm_lifecycle.models.quantize import quantize_model, save_quantized, state_dict_bytes
    from llm_lifecycle.workflows.data.shards import TokenShards

    qcfg = cfg.quant_config()
    model, tokenizer, _ = load_input_model(ctx)
    model = model.cpu()
    seq_len = ctx.values["base_seq_len"]
    size_before = state_dict_bytes(model)
    ppl_before = heldout_perplexity(ctx, model, seq_len, cfg.eval_windows)
    calibration = []
    if qcfg.method != "rtn":
        train = TokenShards(ctx.input_path("shards", "train")).tokens
        calibration = calibration_batches(train, seq_len, cfg.calib_windows, ctx.seed)
    with ctx.progress.task(f"{qcfg.method} int{qcfg.bits} (group {qcfg.group_size})", total=None):
        quantize_model(model, qcfg, calibration)
    size_after = state_dict_bytes(model)
    ppl_after = heldout_perplexity(ctx, model, seq_len, cfg.eval_windows)
    out = ctx.stage_dir / "model"
    save_quantized(out, model, tokenizer, model.cfg.to_dict(), extra=model_provenance(ctx))
    metrics = {"size_mb_before": size_before / 2**20, "size_mb_after": size_after / 2**20,
               "compression": size_before / size_after, "ppl_before": ppl_before, "ppl_after": ppl_after,
               "ppl_change_pct": 100 * (ppl_after - ppl_before) / ppl_before}
    return StageResult(outputs={"quantized": str(out)}, metrics=metrics, model_dir=str(out), aliases=[f"int{qcfg.bits}"])


KIND = StageKind("quantize", QuantizeSettings, run, inputs=(Port("model", "model"), Port("shards", "shards")))
