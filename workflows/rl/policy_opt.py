"""Online RL: GRPO and PPO.

Both sample completions from the current policy (KV-cache generation), score them with the
reward of workflows/rl/rewards.py (a reward model, the checkable answers' rules, or a
weighted sum), and keep the policy near a frozen reference.

GRPO (Shao et al. 2024, DeepSeekMath; DeepSeek-R1, Qwen3): `group_size` samples per prompt;
each sample's advantage is its reward minus the group's mean, over the group's std; no
value model. Loss per token: -A · π/π_old (π_old = π detached, one update per rollout)
+ β·KL(π‖ref) with the k3 estimator exp(ref-π) - (ref-π) - 1, averaged over each
completion's tokens, then over completions.

PPO (Ouyang et al. 2022; Qwen): a critic (a copy of the SFT model with a scalar head), the
reward normalised by a running mean and std (Qwen) and paid at the last token, a per-token
KL penalty to the reference (0.04 by default), GAE advantages (λ 0.95, γ 1), the clipped
surrogate and a clipped value loss, `ppo_epochs` optimizer steps per rollout.

Rollouts are a function of (seed, step) and the policy's weights, so a run resumed from a
checkpoint samples what it would have sampled.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from llm_lifecycle.workflows.data.chat_data import IGNORE_INDEX, _EpochOrder
from llm_lifecycle.workflows.rl.rewards import messages_of
from llm_lifecycle.workflows.rl.verifiable import stop_ids

# reward(prompts, replies, finished) -> (rewards [N], correct [N]): workflows/rl/rewards.py Reward
RewardFn = Callable[[list[dict], list[str], list[bool]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RolloutSettings:
    group_size: int  # samples per prompt
    max_new_tokens: int
    temperature: float
    top_p: float
    system_prompt: str | None
    reward: RewardFn
    thinking_budget: int = 0  # at most this many thinking tokens per sample (0: no limit)


@dataclass
class Samples:
    """One rollout: prompt + completion token rows and their scores."""

    inputs: torch.Tensor  # [N, T] sequence[:-1], right-padded
    targets: torch.Tensor  # [N, T] sequence[1:] on completion tokens, IGNORE_INDEX elsewhere
    rewards: torch.Tensor  # [N]
    correct: torch.Tensor  # [N] 1.0 where the final answer is right
    lengths: torch.Tensor  # [N] completion tokens
    finished: torch.Tensor  # [N] True where the completion stopped before max_new_tokens
    texts: list[str]  # [N] the completions, decoded


def sample(policy, tokenizer, problems: list[dict], s: RolloutSettings, seed: int, pad_id: int) -> Samples:
    """`group_size` completions for each prompt (a dict, workflows/rl/rewards.py), rows grouped
    by prompt (g consecutive rows)."""
    from llm_lifecycle.models.generate import generate, thinking_budget
    from llm_lifecycle.workflows.data.chat_data import encode_prompt

    stops = stop_ids(tokenizer)
    prompts = [encode_prompt(tokenizer, messages_of(p), s.system_prompt) for p in problems]
    rows = [p for p in prompts for _ in range(s.group_size)]
    outs = generate(policy, rows, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                    stop_ids=stops, seed=seed, steer=thinking_budget(tokenizer, s.thinking_budget))
    sequences, texts, finished, lengths = [], [], [], []
    for prompt, out in zip(rows, outs):
        stopped = len(out) < s.max_new_tokens  # a completion cut off never finished: no format credit
        completion = out + [stops[0]] if stopped else out  # train the stop token too
        texts.append(tokenizer.decode(out))
        finished.append(stopped)
        lengths.append(len(completion))
        sequences.append((prompt, completion))
    rewards, correct = s.reward([p for p in problems for _ in range(s.group_size)], texts, finished)
    width = max(len(p) + len(c) for p, c in sequences) - 1
    inputs = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for r, (prompt, completion) in enumerate(sequences):
        seq = torch.tensor(prompt + completion)
        inputs[r, : len(seq) - 1] = seq[:-1]
        targets[r, len(prompt) - 1 : len(seq) - 1] = seq[len(prompt) :]
    return Samples(inputs, targets, rewards.float(), correct.float(), torch.tensor(lengths, dtype=torch.float),
                   torch.tensor(finished), texts)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position [N, T]; 0 where the target is IGNORE_INDEX."""
    mask = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * mask


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); a group that all scored the same
    gets 0 (it says nothing about which completion was better)."""
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True, unbiased=False)
    return ((groups - mean) / (std + eps)).view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Unbiased, always non-negative per-token estimate of KL(π‖ref) from samples of π (Schulman 2020)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def masked_mean_per_row(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def _problem_batches(problems: list[dict], per_step: int, seed: int):
    order = _EpochOrder(len(problems), seed)
    return lambda step: [problems[i] for i in order.indices(step, per_step)]


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (1 << 62)


# ---- GRPO ---------------------------------------------------------------------------------------


def grpo_batches(policy, reference, tokenizer, problems, per_step: int, s: RolloutSettings, seed: int, pad_id: int):
    """batches(start) for the trainer: each step samples a fresh group rollout with the
    current policy. Batch: (inputs, targets, advantages, ref_logps, rewards, correct, lengths)."""
    pick = _problem_batches(problems, per_step, seed)

    def batches(start: int):
        for step in itertools.count(start):
            device = next(policy.parameters()).device
            out = sample(policy, tokenizer, pick(step), s, _step_seed(seed, step), pad_id)
            inputs, targets = out.inputs.to(device), out.targets.to(device)
            with torch.no_grad():
                ref_logps = token_logprobs(reference.to(device)(inputs).logits, targets)
            yield (inputs, targets, group_advantages(out.rewards, s.group_size), ref_logps,
                   out.rewards, out.correct, out.lengths)

    return batches


def grpo_loss(kl_coef: float):
    def loss_fn(model, batch):
        inputs, targets, advantages, ref_logps, rewards, correct, lengths = batch
        mask = (targets != IGNORE_INDEX).float()
        logps = token_logprobs(model(inputs).logits, targets)
        ratio = torch.exp(logps - logps.detach())  # 1 in value; its gradient is ∇log π
        kl = k3_kl(logps, ref_logps)
        per_token = -ratio * advantages[:, None] + kl_coef * kl
        loss = masked_mean_per_row(per_token, mask).mean()
        return loss, {"reward": float(rewards.mean()), "sample_accuracy": float(correct.mean()),
                      "kl": float(masked_mean_per_row(kl.detach(), mask).mean()),
                      "completion_tokens": float(lengths.mean())}

    return loss_fn


# ---- PPO ----------------------------------------------------------------------------------------


class ValueHead(nn.Module):
    """A scalar per position from the decoder's final hidden states (critic and reward model)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        # Unit-scale scores from unit-RMS hidden states; a zero weight would also stop every
        # gradient into the backbone until the head had grown.
        nn.init.normal_(self.proj.weight, std=dim**-0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


class ActorCritic(nn.Module):
    """Policy and critic trained together; the running reward statistics are buffers so a
    checkpoint carries them."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        self.critic = copy.deepcopy(policy)
        self.value_head = ValueHead(policy.cfg.dim)
        self.register_buffer("reward_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("reward_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("reward_m2", torch.zeros((), dtype=torch.float64))

    def begin_global_batch(self) -> None:  # the trainer's per-step hook, for MoE balance counts
        for module in (self.policy, self.critic):
            if hasattr(module, "begin_global_batch"):
                module.begin_global_batch()

    def values(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.value_head(self.critic(inputs).hidden)

    @torch.no_grad()
    def normalise(self, rewards: torch.Tensor) -> torch.Tensor:
        """Update the running mean/variance (Chan et al. parallel merge), then standardise."""
        r = rewards.double().to(self.reward_mean.device)
        n, mean, m2 = r.numel(), r.mean(), ((r - r.mean()) ** 2).sum()
        total = self.reward_count + n
        delta = mean - self.reward_mean
        self.reward_mean += delta * n / total
        self.reward_m2 += m2 + delta**2 * self.reward_count * n / total
        self.reward_count.copy_(total)
        std = (self.reward_m2 / self.reward_count).clamp(min=1e-8).sqrt()
        return ((r - self.reward_mean) / std).float().to(rewards.device)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over each row's masked (completion) positions.
    rewards, values, mask: [N, T]. Returns (advantages, returns), 0 outside the mask."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.size(0), device=rewards.device)
    next_value = torch.zeros_like(last)
    for t in reversed(range(rewards.size(1))):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = torch.where(m.bool(), delta + gamma * lam * last, last)
        advantages[:, t] = last * m
        next_value = torch.where(m.bool(), values[:, t], next_value)
    return advantages, (advantages + values) * mask


def ppo_batches(model: ActorCritic, reference, tokenizer, problems, per_step: int, s: RolloutSettings, seed: int,
                pad_id: int, kl_coef: float, epochs: int, gamma: float, lam: float):
    """batches(start): one rollout every `epochs` steps, yielded `epochs` times. Batch:
    (inputs, targets, old_logps, old_values, advantages, returns, rewards, correct, lengths).
    A run resumed between the epochs of one rollout samples it again with the weights it has
    then, so only a resume on a rollout boundary repeats the original run exactly."""
    pick = _problem_batches(problems, per_step, seed)

    def rollout(step: int):
        device = next(model.parameters()).device
        out = sample(model.policy, tokenizer, pick(step), s, _step_seed(seed, step), pad_id)
        inputs, targets = out.inputs.to(device), out.targets.to(device)
        mask = (targets != IGNORE_INDEX).float()
        with torch.no_grad():
            old_logps = token_logprobs(model.policy(inputs).logits, targets)
            ref_logps = token_logprobs(reference.to(device)(inputs).logits, targets)
            values = model.values(inputs) * mask
        score = model.normalise(out.rewards.to(device))
        token_rewards = -kl_coef * (old_logps - ref_logps) * mask
        last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()  # each row's final token
        token_rewards = token_rewards + last.float() * score[:, None]
        advantages, returns = gae(token_rewards, values, mask, gamma, lam)
        flat = advantages[mask.bool()]
        advantages = (advantages - flat.mean()) / (flat.std() + 1e-8) * mask  # whitened, as in PPO practice
        return (inputs, targets, old_logps, values, advantages, returns, out.rewards, out.correct, out.lengths)

    def batches(start: int):
        current = None
        for step in itertools.count(start):
            rollout_step = step // epochs
            if current is None or current[0] != rollout_step:
                current = (rollout_step, rollout(rollout_step))
            yield current[1]

    return batches


def ppo_loss(clip: float, vf_coef: float):
    def loss_fn(model: ActorCritic, batch):
        inputs, targets, old_logps, old_values, advantages, returns, rewards, correct, lengths = batch
        mask = (targets != IGNORE_INDEX).float()
        logps = token_logprobs(model.policy(inputs).logits, targets)
        ratio = torch.exp(logps - old_logps)
        surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
        values = model.values(inputs)
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        value_loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
        n = mask.sum().clamp(min=1)
        policy_loss = (surrogate * mask).sum() / n
        v_loss = (value_loss * mask).sum() / n
        clipfrac = (((ratio - 1).abs() > clip).float() * mask).sum() / n
        return policy_loss + vf_coef * v_loss, {
            "policy_loss": policy_loss.item(), "value_loss": v_loss.item(), "clipfrac": clipfrac.item(),
            "reward": float(rewards.mean()), "sample_accuracy": float(correct.mean()),
            "completion_tokens": float(lengths.mean()),
        }

    return loss_fn


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.token_to_id("<|endoftext|>")
    return 0 if pad is None else pad

