"""SFT: ChatML conversations, loss on assistant tokens only (Llama 2, Qwen)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from llm_lifecycle.workflows.engine.model_stage import load_init_model, load_input_model, save_stage_model
from llm_lifecycle.workflows.engine.trainer import TrainSettings, lm_loss, train
from llm_lifecycle.workflows.refs import read_data_files
from llm_lifecycle.workflows.rl.verifiable import (
    DEFAULT_SYSTEM_PROMPT,
    AnswerEvalSettings,
    heldout_answer_accuracy,
    load_problem_files,
    thinking_mode_rates,
)
from llm_lifecycle.workflows.runner.settings import (
    AT_LEAST_1,
    NON_EMPTY_STRINGS,
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    setting,
    with_defaults,
)
from llm_lifecycle.workflows.runner.stage import Port, StageContext, StageKind, StageResult, UserError


@dataclass
class SFTSettings(with_defaults(TrainSettings, steps=60, lr=3e-4, warmup_steps=6), AnswerEvalSettings):
    data: list[str] = setting(["builtin:chat/en_dolly_hhrlhf_train_small.jsonl", "builtin:chat/zh_oasst1_sft_zh.json"],
                              "chat files (ShareGPT, OpenAI messages, Alpaca, ...): builtin:NAME or paths",
                              limit=NON_EMPTY_STRINGS, files=True)
    max_examples: int = setting(2000, "use at most this many conversations", limit=AT_LEAST_1)
    heldout_chats: int = setting(64, "chats kept out of training: SFT's held-out loss on assistant tokens",
                                 limit=AT_LEAST_1)
    system_prompt: str = setting(DEFAULT_SYSTEM_PROMPT, "the system turn of chats that bring none "
                                                         "(passed on to the stages after this one)")
    init: str | None = setting(None, "fine-tune this model (a Hugging Face folder or hub id, models:/..., our folder) "
                                     "instead of the input's")
    packing: bool = setting(False, "several chats per row, each attending only to itself")
    lora_rank: int = setting(0, "> 0: train rank-r LoRA adapters on the projections, merged into the saved model",
                             limit=NON_NEGATIVE)
    lora_alpha: float = setting(16.0, "LoRA scale numerator (scale = alpha / rank)", limit=POSITIVE)
    eval_thinking: bool = setting(False, "after training, ask eval_data's problems with /think and with /no_think: "
                                         "how often the reply's think block is non-empty and empty (Qwen3's "
                                         "mode fusion)")

    def check(self, where: str, upstream: dict) -> None:
        if self.eval_thinking and not self.eval_data:
            raise ConfigError(f"{where}.eval_thinking: needs eval_data, the held-out problems to ask in both modes")

    def passes_on(self, upstream: dict[str, Any]) -> dict[str, Any]:
        return {"system_prompt": self.system_prompt}


def load_examples(ctx: StageContext, cfg: SFTSettings, tokenizer) -> list:
    from llm_lifecycle.workflows.data.chat_data import encode_chat, load_conversations

    conversations = read_data_files(cfg.data, f"stages.{ctx.stage}.data", load_conversations)[: cfg.max_examples]
    examples = [encode_chat(tokenizer, c, cfg.seq_len, default_system=cfg.system_prompt) for c in conversations]
    return [e for e in examples if any(e[1])]  # drop chats whose answer was cut away entirely


def split_heldout(examples: list, n: int, seed: int, where: str) -> tuple[list, list]:
    """(n held-out chats, the rest to train on), drawn at random so both hold every source."""
    if len(examples) <= n:
        raise UserError(f"{where}: {len(examples)} usable chats cannot fill heldout_chats={n} and leave some "
                        "to train on; add data or lower heldout_chats")
    order = random.Random(seed).sample(range(len(examples)), len(examples))
    return [examples[i] for i in order[:n]], [examples[i] for i in order[n:]]


def heldout_thinking_rates(ctx: StageContext, cfg: SFTSettings, model, tokenizer) -> dict[str, float]:
    """thinking.{think,no_think}_{followed,accuracy} on eval_data's problems, never trained on."""
    problems = load_problem_files([cfg.eval_data], f"stages.{ctx.stage}.eval_data")[: cfg.eval_n]
    rates = thinking_mode_rates(model, tokenizer, problems, cfg.system_prompt, max_new_tokens=cfg.max_new_tokens)
    return {f"thinking.{name}": value for name, value in rates.items()}


def run(ctx: StageContext, cfg: SFTSettings) -> StageResult:
    from llm_lifecycle.models.lora import apply_lora, merge_lora
    from llm_lifecycle.workflows.data.chat_data import PackedSFTBatches, SFTBatches, assistant_loss

    if cfg.init:
        model, tokenizer = load_init_model(cfg.init, f"stages.{ctx.stage}.init")
    else:
        model, tokenizer, _ = load_input_model(ctx)
    heldout, examples = split_heldout(load_examples(ctx, cfg, tokenizer), cfg.heldout_chats, ctx.seed,
                                      f"stages.{ctx.stage}")
    before = heldout_answer_accuracy(ctx, cfg, model, tokenizer, cfg.system_prompt)
    pad = tokenizer.token_to_id("<|endoftext|>")
    loss_before = assistant_loss(model, heldout, cfg.batch_size, pad)
    if cfg.packing:
        data = PackedSFTBatches(examples, cfg.batch_size, cfg.seq_len, seed=ctx.seed, pad_id=pad)
    else:
        data = SFTBatches(examples, cfg.batch_size, seed=ctx.seed, pad_id=pad)
    trainable = apply_lora(model, cfg.lora_rank, cfg.lora_alpha) if cfg.lora_rank else None
    summary = train(
        ctx, model, cfg, data.batches, lm_loss,
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=model.cfg.flops_per_token(cfg.seq_len),
        trainable=trainable,
        description=ctx.stage,
    )
    if trainable:
        merge_lora(model)
        summary["lora_trainable_params"] = float(sum(p.numel() for _, p in trainable))
    summary["examples"] = float(len(examples))
    summary.update(heldout_loss_before=loss_before, heldout_loss=assistant_loss(model, heldout, cfg.batch_size, pad))
    if before:
        after = heldout_answer_accuracy(ctx, cfg, model.cpu(), tokenizer, cfg.system_prompt)
        summary.update({"heldout_accuracy_before": before["accuracy"], "heldout_accuracy": after["accuracy"],
                        "heldout_format_rate": after["format_rate"]})
    if cfg.eval_thinking:
        summary.update(heldout_thinking_rates(ctx, cfg, model.cpu(), tokenizer))
    model_dir = save_stage_model(ctx, model, tokenizer)
    return StageResult(outputs={"model": str(model_dir)}, metrics=summary, model_dir=str(model_dir))


KIND = StageKind("sft", SFTSettings, run, inputs=(Port("model", "model", unless="init"),), output="model", trains=True)
