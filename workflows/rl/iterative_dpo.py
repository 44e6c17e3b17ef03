"""Online iterative DPO (Qwen2 report; Xiong et al. 2024; Dong et al. 2024, "RLHF Workflow").

Each round:
  1. the current policy samples `group_size` replies to each of `prompts_per_round` prompts;
  2. the reward (workflows/rl/rewards.py: a reward model, rule rewards, or a weighted sum)
     scores them; the best and the worst reply of each prompt make a preference pair (a
     prompt whose replies all score the same teaches nothing: dropped);
  3. the policy trains on those pairs with DPO for `steps` steps.

The policy carries over from round to round; the DPO reference stays the model the first
round started from (the SFT model). That is how RLHFlow's online iterative RLHF runs it
(every iteration starts from the last one's model with the initial model as `--ref_model`):
the KL-regularised objective Xiong et al. analyse is relative to that initial model, so
every round optimises the same target, and β keeps bounding the distance from SFT instead
of allowing a fresh β-sized step per round, as a reference re-anchored each round would.

After every round the policy answers held-out prompts greedily: their reward, and how often
a judge — a second reward model, trained on a disjoint half of the preference data, never
the one that ranked the samples — prefers them to the SFT model's replies (the judge win
rate). Per-round figures go to the tracker with step = round (round 0: the SFT model).

A finished round leaves `round-N/round.json` and its trainer checkpoints, so a re-run
resumes after the last finished round and, within a round, from its newest checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass

import torch

from llm_lifecycle.workflows.data.chat_data import PreferenceBatches, dpo_train_loss, encode_preference
from llm_lifecycle.workflows.engine.trainer import TrainSettings, latest_checkpoint, read_checkpoint, train
from llm_lifecycle.workflows.rl.judge import win_rate
from llm_lifecycle.workflows.rl.policy_opt import RolloutSettings, Samples, pad_id_of, sample
from llm_lifecycle.workflows.rl.rewards import messages_of
from llm_lifecycle.workflows.runner.stage import StageContext, UserError, write_json_atomic


@dataclass
class IterativeDPOSettings:
    rounds: int
    prompts_per_round: int
    rollout: RolloutSettings  # how replies are sampled (group_size per prompt) and rewarded
    beta: float
    sft_weight: float


@dataclass
class Judging:
    """What each round is measured on: held-out prompts, the SFT model's replies to them, and
    the judge (a reward model and its tokenizer), if any."""

    prompts: list[dict]
    sft_replies: list[str]
    judge: tuple | None


# ---- sampling and ranking -----------------------------------------------------------------------


def greedy_replies(policy, tokenizer, prompts: list[dict], s: IterativeDPOSettings) -> Samples:
    """One greedy reply per prompt, rewarded as the samples are."""
    greedy = dataclasses.replace(s.rollout, group_size=1, temperature=0.0)
    return sample(policy, tokenizer, prompts, greedy, seed=0, pad_id=pad_id_of(tokenizer))


def best_worst_pairs(prompts: list[dict], replies: list[str], scores: torch.Tensor,
                     n: int) -> tuple[list[tuple[dict, str, str]], torch.Tensor]:
    """Per prompt, (prompt, highest-scored reply, lowest-scored reply), and each kept pair's
    score gap; prompts whose best and worst tie (or read the same) are left out."""
    pairs, gaps = [], []
    for i, prompt in enumerate(prompts):
        group = scores[i * n : (i + 1) * n]
        best, worst = int(group.argmax()), int(group.argmin())
        chosen, rejected = replies[i * n + best], replies[i * n + worst]
        if group[best] > group[worst] and chosen != rejected:
            pairs.append((prompt, chosen, rejected))
            gaps.append(group[best] - group[worst])
    return pairs, torch.stack(gaps) if gaps else torch.zeros(0)


# ---- one round ----------------------------------------------------------------------------------


def round_prompts(prompts: list[dict], round_index: int, per_round: int) -> list[dict]:
    """Round r's prompts: the next `per_round` of the training prompts, wrapping around."""
    start = round_index * per_round
    return [prompts[(start + i) % len(prompts)] for i in range(per_round)]


class _RoundTracker:
    """The stage's tracker with the trainer's steps shifted past earlier rounds, so the
    per-step DPO curves of all rounds line up one after another."""

    def __init__(self, tracker, offset: int):
        self._tracker, self._offset = tracker, offset

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._tracker.log_metrics(metrics, step=None if step is None else step + self._offset)

    def __getattr__(self, name):
        return getattr(self._tracker, name)


def _train_round(ctx: StageContext, policy, reference, tokenizer, pairs, settings: TrainSettings,
                 s: IterativeDPOSettings, round_index: int) -> dict[str, float]:
    encoded = [encode_preference(tokenizer, messages_of(p), c, r, settings.seq_len,
                                 default_system=s.rollout.system_prompt) for p, c, r in pairs]
    try:
        data = PreferenceBatches(encoded, settings.batch_size, seed=ctx.seed + round_index,
                                 pad_id=pad_id_of(tokenizer))
    except ValueError as err:
        raise UserError(f"stages.{ctx.stage}: round {round_index + 1}: {err}; raise seq_len") from None
    round_ctx = dataclasses.replace(ctx, tracker=_RoundTracker(ctx.tracker, round_index * settings.steps))
    return train(
        round_ctx, policy, settings, data.batches, dpo_train_loss(reference, s.beta, s.sft_weight),
        ckpt_dir=ctx.stage_dir / f"round-{round_index + 1}" / "checkpoints",
        flops_per_token=policy.cfg.flops_per_token(settings.seq_len) * 4 / 3,  # + reference forward
        description=f"iterative dpo, round {round_index + 1}",
    )


def run_round(ctx: StageContext, policy, reference, tokenizer, prompts: list[dict], train_settings: TrainSettings,
              s: IterativeDPOSettings, round_index: int) -> dict[str, float]:
    """Sample, rank, train: one round. The figures of the replies sampled this round (by the
    policy as the round found it) and of its DPO training."""
    seed = ctx.seed * 1_000_003 + round_index
    out = sample(policy, tokenizer, prompts, s.rollout, seed, pad_id_of(tokenizer))
    scores, n = out.rewards, s.rollout.group_size
    pairs, gaps = best_worst_pairs(prompts, out.texts, scores, n)
    if not pairs:
        raise UserError(f"stages.{ctx.stage}: round {round_index + 1}: every prompt's {n} replies got "
                        "the same reward; raise temperature or group_size")
    summary = _train_round(ctx, policy, reference, tokenizer, pairs, train_settings, s, round_index)
    return {"sample_reward": float(scores.mean()), "reward_gap": float(gaps.mean()), "pairs": float(len(pairs)),
            "dpo_loss": summary["final_loss"]}


# ---- measuring ----------------------------------------------------------------------------------


def measure(policy, tokenizer, judging: Judging, s: IterativeDPOSettings) -> dict[str, float]:
    """The policy's greedy replies to the held-out prompts: their reward (the one that ranks
    the samples) and, given a judge, how often the judge prefers them to the SFT model's."""
    if not judging.prompts:
        return {}
    out = greedy_replies(policy, tokenizer, judging.prompts, s)
    figures = {"heldout_reward": float(out.rewards.mean())}
    if judging.judge is not None:
        judge, judge_tokenizer = judging.judge
        judged = win_rate(judge, judge_tokenizer, [messages_of(p) for p in judging.prompts], out.texts,
                          judging.sft_replies, s.rollout.system_prompt)
        figures.update({"judge_win_rate": judged["win_rate"], "judge_score": judged["judge_score_a"]})
    return figures


# ---- the loop -----------------------------------------------------------------------------------


def _finished_round(ctx: StageContext, round_index: int) -> dict[str, float] | None:
    marker = ctx.stage_dir / f"round-{round_index + 1}" / "round.json"
    return json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None


def _restore_round(ctx: StageContext, policy, round_index: int) -> None:
    """The policy as round `round_index` left it: its trainer's last checkpoint."""
    state = read_checkpoint(latest_checkpoint(ctx.stage_dir / f"round-{round_index + 1}" / "checkpoints"))
    policy.load_state_dict(state["model"])


def iterative_dpo(ctx: StageContext, policy, tokenizer, judge: tuple | None,
                  train_prompts: list[dict], heldout_prompts: list[dict], train_settings: TrainSettings,
                  s: IterativeDPOSettings) -> dict[str, float]:
    """Run the rounds on `policy` in place; the summary (each round's figures suffixed by its
    number). `judge`: (reward model, its tokenizer) or None."""
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    sft_replies = greedy_replies(reference, tokenizer, heldout_prompts, s).texts if heldout_prompts else []
    judging = Judging(heldout_prompts, sft_replies, judge)
    figures = measure(policy, tokenizer, judging, s)
    ctx.tracker.log_metrics({f"round.{k}": v for k, v in figures.items()}, step=0)
    summary = {"heldout_prompts": float(len(heldout_prompts)), **{f"{k}.round0": v for k, v in figures.items()}}
    for r in range(s.rounds):
        done = _finished_round(ctx, r)
        if done is None:
            prompts = round_prompts(train_prompts, r, s.prompts_per_round)
            done = run_round(ctx, policy, reference, tokenizer, prompts, train_settings, s, r)
            done.update(measure(policy.cpu(), tokenizer, judging, s))
            write_json_atomic(ctx.stage_dir / f"round-{r + 1}" / "round.json", done)
        else:
            _restore_round(ctx, policy, r)
            ctx.progress.log(f"  round {r + 1} finished earlier: reusing it")
        ctx.tracker.log_metrics({f"round.{k}": v for k, v in done.items()}, step=r + 1)
        summary.update({f"{k}.round{r + 1}": v for k, v in done.items()})
        ctx.progress.log(f"  round {r + 1}: " + ", ".join(f"{k} {v:.3g}" for k, v in done.items()))
    return summary
