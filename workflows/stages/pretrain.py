"""Pretrain on the packed token shards, from scratch or from `init`: next-token prediction, or
GLM's autoregressive blank infilling (`objective: glm_blank_infilling`, see workflows/engine/glm.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llm_lifecycle.workflows.data.mixture import parse_schedule, scheduled_batches
from llm_lifecycle.workflows.engine.glm import add_glm_tokens, glm_batches, packed_length
from llm_lifecycle.workflows.engine.model_stage import (
    heldout_perplexity,
    load_init_model,
    load_input_model,
    save_stage_model,
)
from llm_lifecycle.workflows.engine.trainer import TrainSettings, lm_loss, train
from llm_lifecycle.workflows.runner.settings import NON_NEGATIVE, ConfigError, Limit, setting
from llm_lifecycle.workflows.runner.stage import Port, StageContext, StageKind, StageResult, UserError

OBJECTIVES = ("causal", "glm_blank_infilling")


@dataclass
class PretrainSettings(TrainSettings):
    objective: str = setting("causal", "causal: next-token prediction; glm_blank_infilling: GLM (needs model.rope_2d)",
                             choices=OBJECTIVES)
    glm_mask_ratio: float = setting(0.15, "share of each window cut out as blanks (GLM)",
                                    limit=Limit(lambda v: 0 < v < 0.5, "a number above 0 and below 0.5"))
    glm_mean_span: float = setting(3.0, "Poisson mean of a blank's length (GLM)",
                                   limit=Limit(lambda v: v >= 1, "a number >= 1"))
    mtp_depth: int = setting(0, "> 0: DeepSeek-V3 multi-token prediction, this many further tokens (V3: 1; "
                                "models/mtp.py)", limit=NON_NEGATIVE)
    mtp_weight: float = setting(0.3, "the MTP loss's weight (V3: 0.3, then 0.1 for the last 4.8T tokens)",
                                limit=NON_NEGATIVE)
    schedule: list[Any] = setting([], "data phases, mixtures of data-fetch groups (docs/data.md)")
    init: str | None = setting(None, "start from this model (a Hugging Face folder or hub id, models:/..., our "
                                     "folder) instead of random weights")
    model: dict | None = setting(None, "this instance's own model: a preset and/or overrides of the recipe's "
                                       "model (e.g. {preset: llama-small, n_layers: 2} for a smaller student)")

    def model_fields(self, upstream: dict[str, Any]) -> dict[str, Any]:
        """The ModelConfig fields a from-scratch run builds: the recipe's model, with `model` over it."""
        if not self.model:
            return upstream["model"]
        from llm_lifecycle.models.config import ModelConfig
        from llm_lifecycle.models.presets import load_preset

        overrides = dict(self.model)
        base = load_preset(overrides.pop("preset")) if "preset" in overrides else upstream["model"]
        cfg = ModelConfig.from_dict({**base, **overrides, "vocab_size": upstream["model"]["vocab_size"]})
        cfg.validate()
        return cfg.to_dict()

    def check(self, where: str, upstream: dict[str, Any]) -> None:
        try:
            model = self.model_fields(upstream)
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"{where}.model: {err}") from None
        if self.objective == "glm_blank_infilling":
            if not model["rope_2d"]:
                raise ConfigError(f"{where}.objective glm_blank_infilling needs GLM's 2D positions; "
                                  "set model.rope_2d: true (as the chatglm-small preset does)")
            if self.init:
                raise ConfigError(f"{where}.init continues causal pretraining; objective glm_blank_infilling "
                                  "starts from scratch")
        if self.mtp_depth and self.objective != "causal":
            raise ConfigError(f"{where}.mtp_depth predicts further tokens of causal text; objective "
                              f"{self.objective} has its own targets; set mtp_depth: 0")

    def passes_on(self, upstream: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model_fields(upstream), "seq_len": self.seq_len, "base_seq_len": self.seq_len}


def run(ctx: StageContext, cfg: PretrainSettings) -> StageResult:
    from tokenizers import Tokenizer

    from llm_lifecycle.models.config import ModelConfig
    from llm_lifecycle.models.decoder import Decoder
    from llm_lifecycle.workflows.data.shards import TokenShards

    schedule = parse_schedule(cfg.schedule, f"stages.{ctx.stage}.schedule")
    tokenizer = Tokenizer.from_file(str(ctx.input_path("tokenizer", "tokenizer")))
    shards = TokenShards(ctx.input_path("shards", "train"))
    glm = cfg.objective == "glm_blank_infilling"
    torch.manual_seed(ctx.seed)
    if "model" in ctx.inputs:  # a later pretraining phase: continue the model of an earlier one
        model, _, _ = load_input_model(ctx)
        model_cfg = model.cfg
        model_cfg.max_seq_len = max(model_cfg.max_seq_len, cfg.seq_len)
    elif cfg.init:  # continued pretraining of an existing model, on shards made with its own tokenizer
        model, init_tokenizer = load_init_model(cfg.init, f"stages.{ctx.stage}.init")
        model = fit_to_tokenizer(model, init_tokenizer, tokenizer, cfg.init)
        model_cfg = model.cfg
        model_cfg.max_seq_len = max(model_cfg.max_seq_len, cfg.seq_len)
    else:
        model_cfg = ModelConfig.from_dict(cfg.model_fields(ctx.values))
        model_cfg.max_seq_len = max(model_cfg.max_seq_len, cfg.seq_len)
        if glm:  # [MASK] [sop] [eop] join the vocabulary (saved with the model's tokenizer)
            glm_ids = add_glm_tokens(tokenizer)
            model_cfg.vocab_size = max(model_cfg.vocab_size, tokenizer.get_vocab_size())
            model_cfg.max_seq_len = max(model_cfg.max_seq_len, packed_length(cfg.seq_len, cfg.glm_mask_ratio, cfg.glm_mean_span))
        model = Decoder(model_cfg)
    ctx.tracker.log_metrics({"params": model_cfg.num_params(), "active_params": model_cfg.active_params()})
    ppl_before = heldout_perplexity(ctx, model, cfg.seq_len, max_windows=16)
    trained, loss_fn, flops_per_token = model, lm_loss, model_cfg.flops_per_token(cfg.seq_len)
    if cfg.mtp_depth:  # DeepSeek-V3's multi-token prediction: extra modules that train, then are dropped
        from llm_lifecycle.models.mtp import MultiTokenPrediction

        trained = MultiTokenPrediction(model, cfg.mtp_depth, cfg.mtp_weight)
        loss_fn, flops_per_token = mtp_loss, trained.flops_per_token(cfg.seq_len)

    def batches(start: int):
        windows = scheduled_batches(shards, schedule, cfg, seed=ctx.seed, start_micro_step=start)
        if not glm:
            return windows
        return glm_batches(windows, glm_ids, ctx.seed, start, cfg.glm_mask_ratio, cfg.glm_mean_span)

    summary = train(
        ctx, trained, cfg, batches, loss_fn,
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=flops_per_token,
        description=ctx.stage,
    )
    summary["heldout_ppl_before"] = ppl_before
    summary["heldout_ppl"] = heldout_perplexity(ctx, model, cfg.seq_len, max_windows=16)
    model_dir = save_stage_model(ctx, model, tokenizer)
    return StageResult(outputs={"model": str(model_dir)}, metrics=summary, model_dir=str(model_dir))


def mtp_loss(model, batch) -> tuple[torch.Tensor, dict[str, float]]:
    """lm_loss (whose aux_loss now carries the weighted MTP term), plus each MTP depth's own
    cross-entropy and their mean as metrics."""
    loss, metrics = lm_loss(model, batch)
    depths = model.mtp_losses
    metrics.update({f"mtp_loss.depth{k}": v for k, v in enumerate(depths, start=1)})
    metrics["mtp_loss"] = sum(depths) / len(depths)
    return loss, metrics


def fit_to_tokenizer(model, init_tokenizer, tokenizer, init_ref: str):
    """The init model, its embedding (and head) grown when tokenizer-train extended its
    tokenizer (Chinese-LLaMA: new tokens appended, every old token keeping its id; the new
    rows start as the mean row). Any other tokenizer would scramble what the model learned."""
    from llm_lifecycle.models.checkpoint import grow_vocab
    from llm_lifecycle.models.decoder import Decoder

    old, new = init_tokenizer.get_vocab(), tokenizer.get_vocab()
    if old == new:
        return model
    if any(new.get(token) != i for token, i in old.items()):
        raise UserError(
            f"pretrain init: {init_ref}'s tokenizer is not the start of tokenizer-train's (its tokens "
            f"would change ids); leave tokenizer-train.pretrained unset to use the model's own, or set "
            f"tokenizer-train.extend: {init_ref} to add tokens to it"
        )
    if tokenizer.get_vocab_size() <= model.cfg.vocab_size:  # the embedding already has spare rows
        return model
    cfg, state = grow_vocab(model.cfg, model.state_dict(), tokenizer.get_vocab_size())
    grown = Decoder(cfg)
    grown.load_state_dict(state)
    return grown


KIND = StageKind(
    "pretrain", PretrainSettings, run,
    # A later pretraining phase names the earlier phase (or an upcycle) in `from:` to continue its
    # model; that port comes first so the model's values (its config) win over the tokenizer's.
    inputs=(Port("model", "model", required=False, default=False), Port("tokenizer", "tokenizer"), Port("shards", "shards")),
    output="model", trains=True,
)
