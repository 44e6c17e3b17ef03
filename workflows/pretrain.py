"""Pretrain on the packed token shards, from scratch or from `init`: next-token prediction, or
GLM's autoregressive blank infilling (`objective: glm_blank_infilling`, see workflows/glm.py)."""

from __future__ import annotations

import torch

from llm_lifecycle.workflows.glm import add_glm_tokens, glm_batches, packed_length
from llm_lifecycle.workflows.mixture import parse_schedule, scheduled_batches
from llm_lifecycle.workflows.model_stage import heldout_perplexity, load_init_model, save_stage_model
from llm_lifecycle.workflows.stage import StageContext, StageResult, UserError
from llm_lifecycle.workflows.trainer import TrainSettings, lm_loss, train


def run(ctx: StageContext, cfg: dict) -> StageResult:
    from tokenizers import Tokenizer

    from llm_lifecycle.models.decoder import Decoder
    from llm_lifecycle.workflows.shards import TokenShards

    settings = TrainSettings.from_cfg(cfg)
    schedule = parse_schedule(cfg["schedule"], "stages.pretrain.schedule")
    tokenizer = Tokenizer.from_file(str(ctx.upstream_output("tokenizer-train", "tokenizer")))
    shards = TokenShards(ctx.upstream_output("tokenize", "train"))
    glm = cfg["objective"] == "glm_blank_infilling"
    torch.manual_seed(ctx.seed)
    if cfg["init"]:  # continued pretraining of an existing model, on shards made with its own tokenizer
        if glm:
            raise UserError("stages.pretrain.init continues causal pretraining; objective glm_blank_infilling starts from scratch")
        model, init_tokenizer = load_init_model(cfg["init"], "stages.pretrain.init")
        model = fit_to_tokenizer(model, init_tokenizer, tokenizer, cfg["init"])
        model_cfg = model.cfg
        model_cfg.max_seq_len = max(model_cfg.max_seq_len, settings.seq_len)
    else:
        model_cfg = ctx.recipe.model_config()
        model_cfg.max_seq_len = max(model_cfg.max_seq_len, settings.seq_len)
        if glm:  # [MASK] [sop] [eop] join the vocabulary (saved with the model's tokenizer)
            glm_ids = add_glm_tokens(tokenizer)
            model_cfg.vocab_size = max(model_cfg.vocab_size, tokenizer.get_vocab_size())
            model_cfg.max_seq_len = max(model_cfg.max_seq_len, packed_length(settings.seq_len, cfg["glm_mask_ratio"], cfg["glm_mean_span"]))
        model = Decoder(model_cfg)
    ctx.tracker.log_metrics({"params": model_cfg.num_params(), "active_params": model_cfg.active_params()})
    trained, loss_fn, flops_per_token = model, lm_loss, model_cfg.flops_per_token(settings.seq_len)
    if cfg["mtp_depth"]:  # DeepSeek-V3's multi-token prediction: extra modules that train, then are dropped
        from llm_lifecycle.models.mtp import MultiTokenPrediction

        trained = MultiTokenPrediction(model, cfg["mtp_depth"], cfg["mtp_weight"])
        loss_fn, flops_per_token = mtp_loss, trained.flops_per_token(settings.seq_len)

    def batches(start: int):
        windows = scheduled_batches(shards, schedule, settings, seed=ctx.seed, start_micro_step=start)
        if not glm:
            return windows
        return glm_batches(windows, glm_ids, ctx.seed, start, cfg["glm_mask_ratio"], cfg["glm_mean_span"])

    summary = train(
        ctx, trained, settings, batches, loss_fn,
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=flops_per_token,
        description="pretrain",
    )
    summary["heldout_ppl"] = heldout_perplexity(ctx, model, settings.seq_len, max_windows=16)
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
            f"stages.pretrain.init: {init_ref}'s tokenizer is not the start of tokenizer-train's (its tokens "
            f"would change ids); leave tokenizer-train.pretrained unset to use the model's own, or set "
            f"tokenizer-train.extend: {init_ref} to add tokens to it"
        )
    if tokenizer.get_vocab_size() <= model.cfg.vocab_size:  # the embedding already has spare rows
        return model
    cfg, state = grow_vocab(model.cfg, model.state_dict(), tokenizer.get_vocab_size())
    grown = Decoder(cfg)
    grown.load_state_dict(state)
    return grown
