"""SFT: ChatML conversations, loss on assistant tokens only (Llama 2, Qwen)."""

from __future__ import annotations

import random

from llm_lifecycle.workflows.model_stage import builtin_or_path, load_init_model, load_upstream_model, save_stage_model
from llm_lifecycle.workflows.stage import StageContext, StageResult, UserError
from llm_lifecycle.workflows.trainer import TrainSettings, lm_loss, train
from llm_lifecycle.workflows.verifiable import heldout_answer_accuracy


def load_examples(ctx: StageContext, cfg: dict, tokenizer) -> list:
    from llm_lifecycle.workflows.chat_data import encode_chat, load_conversations

    conversations = []
    for uri in cfg["data"]:
        try:
            conversations.extend(load_conversations(builtin_or_path(uri, f"stages.{ctx.stage}.data")))
        except ValueError as err:
            raise UserError(f"stages.{ctx.stage}.data: {err}") from None
    conversations = conversations[: cfg["max_examples"]]
    examples = [encode_chat(tokenizer, c, cfg["seq_len"], default_system=cfg["system_prompt"]) for c in conversations]
    return [e for e in examples if any(e[1])]  # drop chats whose answer was cut away entirely


def split_heldout(examples: list, n: int, seed: int) -> tuple[list, list]:
    """(n held-out chats, the rest to train on), drawn at random so both hold every source."""
    if len(examples) <= n:
        raise UserError(f"stages.sft: {len(examples)} usable chats cannot fill heldout_chats={n} and leave some "
                        "to train on; add data or lower heldout_chats")
    order = random.Random(seed).sample(range(len(examples)), len(examples))
    return [examples[i] for i in order[:n]], [examples[i] for i in order[n:]]


def run(ctx: StageContext, cfg: dict) -> StageResult:
    from llm_lifecycle.models.lora import apply_lora, merge_lora
    from llm_lifecycle.workflows.chat_data import PackedSFTBatches, SFTBatches, assistant_loss

    settings = TrainSettings.from_cfg(cfg)
    if cfg["init"]:
        model, tokenizer = load_init_model(cfg["init"], "stages.sft.init")
    else:
        model, tokenizer, _ = load_upstream_model(ctx, "extend-context")
    heldout, examples = split_heldout(load_examples(ctx, cfg, tokenizer), cfg["heldout_chats"], ctx.seed)
    before = heldout_answer_accuracy(ctx, cfg, model, tokenizer)
    pad = tokenizer.token_to_id("<|endoftext|>")
    loss_before = assistant_loss(model, heldout, settings.batch_size, pad)
    if cfg["packing"]:
        data = PackedSFTBatches(examples, settings.batch_size, settings.seq_len, seed=ctx.seed, pad_id=pad)
    else:
        data = SFTBatches(examples, settings.batch_size, seed=ctx.seed, pad_id=pad)
    if cfg["lora_rank"] < 0:
        raise UserError(f"stages.sft.lora_rank: expected 0 (full fine-tuning) or a positive rank, got {cfg['lora_rank']}")
    trainable = apply_lora(model, cfg["lora_rank"], cfg["lora_alpha"]) if cfg["lora_rank"] else None
    summary = train(
        ctx, model, settings, data.batches, lm_loss,
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=model.cfg.flops_per_token(settings.seq_len),
        trainable=trainable,
        description="sft",
    )
    if trainable:
        merge_lora(model)
        summary["lora_trainable_params"] = float(sum(p.numel() for _, p in trainable))
    summary["examples"] = float(len(examples))
    summary.update(heldout_loss_before=loss_before, heldout_loss=assistant_loss(model, heldout, settings.batch_size, pad))
    if before:
        after = heldout_answer_accuracy(ctx, cfg, model.cpu(), tokenizer)
        summary.update({"heldout_accuracy_before": before["accuracy"], "heldout_accuracy": after["accuracy"],
                        "heldout_format_rate": after["format_rate"]})
    model_dir = save_stage_model(ctx, model, tokenizer)
    return StageResult(outputs={"model": str(model_dir)}, metrics=summary, model_dir=str(model_dir))
