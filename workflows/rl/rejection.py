"""Rejection sampling: a model answers problems, answers that check out are kept, and a model
is fine-tuned on them. rl's rs-sft fine-tunes the model that sampled (Llama 2, DeepSeek-R1's
third stage); distill fine-tunes another, smaller one (DeepSeek-R1's distilled models)."""

from __future__ import annotations

from llm_lifecycle.workflows.rl.policy_opt import RolloutSettings, pad_id_of, sample
from llm_lifecycle.workflows.rl.verifiable import format_reward
from llm_lifecycle.workflows.runner.stage import StageContext, UserError


def correct_answers(ctx: StageContext, model, tokenizer, problems: list[dict], rollout: RolloutSettings) -> list[list[dict]]:
    """For each problem, the best of `group_size` sampled answers when it is right and well
    formed, as a chat [user question, assistant answer]; problems with none are dropped."""
    kept: list[list[dict]] = []
    per_call = max(1, 64 // rollout.group_size)
    with ctx.progress.task("rejection sampling", total=len(problems)) as bar:
        for start in range(0, len(problems), per_call):
            chunk = problems[start : start + per_call]
            out = sample(model, tokenizer, chunk, rollout, seed=ctx.seed + start, pad_id=pad_id_of(tokenizer))
            for i, problem in enumerate(chunk):
                rows = range(i * rollout.group_size, (i + 1) * rollout.group_size)
                best = max(rows, key=lambda r: float(out.rewards[r]))
                if out.correct[best] and out.finished[best] and format_reward(out.texts[best]):
                    kept.append([{"role": "user", "content": problem["question"]},
                                 {"role": "assistant", "content": out.texts[best]}])
            bar.advance(len(chunk))
    if not kept:
        raise UserError(f"{ctx.stage}: no sampled answer was correct; train the sampling model longer or sample more "
                        "answers per problem")
    return kept


def fine_tune_on(ctx: StageContext, model, tokenizer, settings, chats: list[list[dict]], system_prompt: str) -> dict:
    """SFT (assistant-only loss) of `model` on `chats` with the training `settings`; its summary."""
    from llm_lifecycle.workflows.data.chat_data import SFTBatches, encode_chat
    from llm_lifecycle.workflows.engine.trainer import lm_loss, train

    examples = [encode_chat(tokenizer, c, settings.seq_len, default_system=system_prompt) for c in chats]
    data = SFTBatches(examples, settings.batch_size, seed=ctx.seed, pad_id=pad_id_of(tokenizer))
    return train(
        ctx, model, settings, data.batches, lm_loss,
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=model.cfg.flops_per_token(settings.seq_len),
        description=ctx.stage,
    )
