"""Distill: a strong model's checked solutions teach a smaller one (DeepSeek-R1's distilled
dense models; Qwen3's strong-to-weak distillation, here in its off-policy form).

The teacher (the input on port `teacher`, by default the nearest earlier model) answers
`n_prompts` problems `samples` times each; the best answer to each problem is kept when it
is right and well formed (rejection sampling, as R1 curated its 800k samples); the student
(port `student`, named in `from:`) is fine-tuned on them with the loss on the answer only.
Held-out answer accuracy of the student is measured before and after.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_lifecycle.workflows.engine.model_stage import load_input_model, save_stage_model
from llm_lifecycle.workflows.engine.trainer import TrainSettings
from llm_lifecycle.workflows.rl.verifiable import (
    DEFAULT_SYSTEM_PROMPT,
    AnswerEvalSettings,
    heldout_answer_accuracy,
    load_problem_files,
)
from llm_lifecycle.workflows.runner.settings import AT_LEAST_1, NON_EMPTY_STRINGS, POSITIVE, setting, with_defaults
from llm_lifecycle.workflows.runner.stage import Port, StageContext, StageKind, StageResult


@dataclass
class DistillSettings(with_defaults(TrainSettings, steps=60, lr=3e-4, warmup_steps=6), AnswerEvalSettings):
    problems: list[str] = setting(["builtin:arith/train.jsonl.gz"], "GSM8K-format problems the teacher answers",
                                  limit=NON_EMPTY_STRINGS, files=True)
    n_prompts: int = setting(256, "problems the teacher answers", limit=AT_LEAST_1)
    samples: int = setting(4, "answers sampled per problem; the best right one is kept", limit=AT_LEAST_1)
    temperature: float = setting(0.7, "the teacher's sampling temperature", limit=POSITIVE)


def run(ctx: StageContext, cfg: DistillSettings) -> StageResult:
    from llm_lifecycle.workflows.rl.policy_opt import RolloutSettings
    from llm_lifecycle.workflows.rl.rejection import correct_answers, fine_tune_on
    from llm_lifecycle.workflows.rl.rewards import Reward, RewardSettings

    system = ctx.values.get("system_prompt", DEFAULT_SYSTEM_PROMPT)
    teacher, teacher_tokenizer, _ = load_input_model(ctx, "teacher")
    rollout = RolloutSettings(group_size=cfg.samples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_p=1.0, system_prompt=system, reward=Reward(RewardSettings()))
    problems = load_problem_files(cfg.problems, f"stages.{ctx.stage}.problems")[: cfg.n_prompts]
    solutions = correct_answers(ctx, teacher, teacher_tokenizer, problems, rollout)
    del teacher
    student, tokenizer, _ = load_input_model(ctx, "student")
    before = heldout_answer_accuracy(ctx, cfg, student, tokenizer, system)
    summary = fine_tune_on(ctx, student, tokenizer, cfg, solutions, system)
    summary.update({"distill_samples": float(len(solutions)), "teacher_acceptance": len(solutions) / len(problems),
                    "student_params": float(student.cfg.num_params())})
    if before:
        after = heldout_answer_accuracy(ctx, cfg, student.cpu(), tokenizer, system)
        summary.update({"heldout_accuracy_before": before["accuracy"], "heldout_accuracy": after["accuracy"],
                        "heldout_format_rate": after["format_rate"]})
    model_dir = save_stage_model(ctx, student, tokenizer)
    return StageResult(outputs={"model": str(model_dir)}, metrics=summary, model_dir=str(model_dir))


KIND = StageKind(
    "distill", DistillSettings, run,
    inputs=(Port("teacher", "model", passes=False), Port("student", "model", default=False)),
    output="model", trains=True,
)
