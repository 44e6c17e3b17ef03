"""A reward model as judge: how often it prefers one set of replies to another on the same
prompts. The judge must be a reward model that did not give the training reward (one
trained on a disjoint half of the preference data), or a policy that learnt to please its
reward model would look better than it is."""

from __future__ import annotations

from llm_lifecycle.workflows.rl.reward_model import RewardModel, pair_accuracy, score_replies


def win_rate(judge: RewardModel, tokenizer, prompts: list[list[dict]], replies_a: list[str], replies_b: list[str],
             system_prompt: str | None) -> dict[str, float]:
    """{"win_rate": share of prompts where the judge scores reply a above reply b (a tie
    counts half), "judge_score_a", "judge_score_b": the mean scores, "n": prompts judged}."""
    a = score_replies(judge, tokenizer, prompts, replies_a, system_prompt)
    b = score_replies(judge, tokenizer, prompts, replies_b, system_prompt)
    return {"win_rate": float(pair_accuracy(a, b)), "judge_score_a": float(a.mean()),
            "judge_score_b": float(b.mean()), "n": float(len(prompts))}
