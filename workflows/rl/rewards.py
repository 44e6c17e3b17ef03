"""Where PPO and GRPO get their reward: one weighted sum of

  model     a learned reward model's score (InstructGPT, Llama 2, Qwen): an rm instance wired to
            the rl stage's `reward_model` input, or `reward_model: models:/NAME@rm`
  correct   the arithmetic checker: 1 for the right final number (problems with answers only)
  format    ending with a `#### N` line (workflows/rl/verifiable.py)
  think     DeepSeek-R1's format reward: the reply opens with a non-empty <think>...</think>
            block and an answer follows it
  language  DeepSeek-R1's language-consistency reward: the share of the reply's words in the
            language of the prompt

Two reward models combine by Llama 2's rule: the safety model's score where the prompt is of
kind `safety` or that score's sigmoid is below `safety_threshold` (0.15 in the paper), the
helpfulness model's elsewhere (the whitening Llama 2 then applies is the optimizer's: PPO's
running normalisation, GRPO's group standardisation). A conditional reward model (InternLM2's
COOL RLHF) scores each prompt under the system prompt of its kind (`kind_prompts`), the one it
was trained with for that kind of preference pairs.

A prompt is a dict {"messages": the conversation so far, "answer": the reference or None,
"kind": its data file's kind or None}; GSM8K problems {"question", "answer"} are read as one
user turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_lifecycle.workflows.rl.verifiable import correctness_reward, format_reward
from llm_lifecycle.workflows.runner.settings import FRACTION, NON_NEGATIVE, ConfigError, Settings, setting

SAFETY_KIND = "safety"
MODEL_URIS = ("models:/", "runs:/")


# ---- prompts ------------------------------------------------------------------------------------


def messages_of(prompt: dict) -> list[dict]:
    """The conversation a prompt asks the policy to continue."""
    return prompt["messages"] if "messages" in prompt else [{"role": "user", "content": prompt["question"]}]


def user_text(prompt: dict) -> str:
    """The user turns of a prompt, joined: what a reply's language is compared with."""
    return " ".join(m["content"] for m in messages_of(prompt) if m["role"] == "user")


def has_answers(path: str | Path) -> bool:
    """Whether a prompt file holds problems with answers to check (GSM8K's question/answer
    records) rather than open-ended conversations."""
    from llm_lifecycle.workflows.data.chat_data import read_records

    return {"question", "answer"} <= read_records(path)[0].keys()


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompts from a file of GSM8K problems (with answers), of preference pairs (their shared
    conversation) or of conversations (up to the last user turn): open-ended chat prompts
    carry no answer. Repeated conversations are kept once."""
    from llm_lifecycle.workflows.data.chat_data import load_conversations, load_preference_pairs

    if has_answers(path):
        from llm_lifecycle.workflows.rl.verifiable import load_problems

        return [{"messages": messages_of(p), "answer": p["answer"]} for p in load_problems(path)]
    try:
        conversations = [prompt for prompt, _, _ in load_preference_pairs(path)]
    except ValueError:
        chats = load_conversations(path)
        conversations = [c[: max(i for i, m in enumerate(c) if m["role"] == "user") + 1] for c in chats]
    seen, prompts = set(), []
    for messages in conversations:
        key = tuple((m["role"], m["content"]) for m in messages)
        if messages and messages[-1]["role"] == "user" and key not in seen:
            seen.add(key)
            prompts.append({"messages": messages, "answer": None})
    return prompts


# ---- rule rewards -------------------------------------------------------------------------------

_THINK = re.compile(r"\A\s*<think>(.*?)</think>(.*)\Z", re.DOTALL)
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W\d_]+")  # a CJK character or a run of letters


def think_format_reward(reply: str) -> float:
    """1 when the reply is `<think>reasoning</think>answer` with both parts non-empty, else 0."""
    match = _THINK.match(reply)
    return float(bool(match and match.group(1).strip() and match.group(2).strip()))


def _language(word: str) -> str:
    return "zh" if _CJK.match(word) else "other"


def language_consistency_reward(prompt_text: str, reply: str) -> float:
    """Share of the reply's words (CJK characters, runs of letters) in the script most of the
    prompt's words are in: Chinese or not (R1 paid for the chain of thought staying in the
    prompt's language). A reply with no words gets 0."""
    prompt_words, reply_words = _WORD.findall(prompt_text), _WORD.findall(reply)
    if not reply_words:
        return 0.0
    zh = sum(_language(w) == "zh" for w in prompt_words)
    target = "zh" if zh * 2 > len(prompt_words) else "other"
    return sum(_language(w) == target for w in reply_words) / len(reply_words)


# ---- settings -----------------------------------------------------------------------------------


@dataclass
class RewardSettings(Settings):
    """The reward of ppo and grpo (see workflows/rl/rewards.py); the kinds also label rm's pairs."""

    reward_model: str | None = setting(None, "score replies with this reward model (models:/NAME@rm, a folder); "
                                             "or wire an rm instance with `from: {reward_model: NAME}`")
    reward_model_weight: float = setting(1.0, "weight of the reward model's score in the reward", limit=NON_NEGATIVE)
    safety_model: str | None = setting(None, "Llama 2: a safety reward model, used over reward_model on `safety` "
                                             "prompts and below safety_threshold; or `from: {safety_model: NAME}`")
    safety_threshold: float = setting(0.15, "Llama 2: use the safety score where its sigmoid is below this",
                                      limit=FRACTION)
    correct_reward: float = setting(1.0, "paid for the right final number (prompts with answers)", limit=NON_NEGATIVE)
    format_reward: float = setting(0.2, "paid for ending with a '#### N' line (prompts with answers)",
                                   limit=NON_NEGATIVE)
    think_reward: float = setting(0.0, "DeepSeek-R1's format reward: a non-empty <think>...</think> block, then "
                                       "the answer", limit=NON_NEGATIVE)
    language_reward: float = setting(0.0, "DeepSeek-R1's language consistency: share of the reply's words in the "
                                          "prompt's language", limit=NON_NEGATIVE)
    judge: str | None = setting(None, "ppo, grpo, iterative-dpo: a reward model that judges held-out replies against the input "
                                      "model's (never the one giving the reward); or `from: {judge: NAME}`")
    kinds: list[str] = setting([], "the kind of each data file, in order (rm, dpo: `data`; ppo, grpo: `problems`), "
                                   "e.g. [safety, helpful]: held-out accuracy per kind, Llama 2's safety rule")
    kind_prompts: dict[str, str] = setting({}, "COOL RLHF conditional reward model: the system prompt of each kind, "
                                               "used to train it (rm) and to score that kind's prompts (ppo, grpo)")

    def rules_pay(self, answers: bool) -> bool:
        """Whether the rule rewards can tell replies apart, to prompts with `answers` or without."""
        return bool((answers and (self.correct_reward or self.format_reward)) or self.think_reward
                    or self.language_reward)

    def check(self, where: str, upstream: dict[str, Any]) -> None:
        super().check(where, upstream)
        for key in ("reward_model", "safety_model", "judge"):
            ref = getattr(self, key)
            if ref is not None and not ref.startswith(MODEL_URIS) and not Path(ref).expanduser().is_dir():
                raise ConfigError(f"{where}.{key}: {ref!r} is not a folder; give models:/NAME@ALIAS, runs:/..., or "
                                  "the folder of a reward model (rl method rm)")
        if any(not isinstance(k, str) or not k for k in self.kinds):
            raise ConfigError(f"{where}.kinds: expected a list of non-empty names, one per data file")
        unknown = sorted(set(self.kind_prompts) - set(self.kinds))
        if unknown:
            raise ConfigError(f"{where}.kind_prompts: {', '.join(map(repr, unknown))} is not among kinds "
                              f"{self.kinds}; name each data file's kind in `kinds`")
        if any(not isinstance(v, str) or not v.strip() for v in self.kind_prompts.values()):
            raise ConfigError(f"{where}.kind_prompts: each kind's system prompt must be a non-empty string")


def check_kinds(cfg: RewardSettings, files: list[str], where: str) -> list[str | None]:
    """The kind of each of `files`: `kinds` in order, or None for all when none are given."""
    if not cfg.kinds:
        return [None] * len(files)
    if len(cfg.kinds) != len(files):
        raise ConfigError(f"{where}.kinds: {len(cfg.kinds)} kinds for {len(files)} data files; give one per file")
    return list(cfg.kinds)


# ---- the reward ---------------------------------------------------------------------------------


@dataclass
class RewardModels:
    """The loaded reward models: helpfulness (or the only one), Llama 2's safety model, and
    each one's tokenizer. `kind_prompts` maps a prompt's kind to the system prompt a
    conditional model scores it under; `system_prompt` serves every other prompt."""

    helpful: Any = None
    helpful_tokenizer: Any = None
    safety: Any = None
    safety_tokenizer: Any = None
    system_prompt: str | None = None
    kind_prompts: dict[str, str] = field(default_factory=dict)
    safety_threshold: float = 0.15

    def _scores(self, model, tokenizer, prompts: list[dict], replies: list[str]) -> torch.Tensor:
        """Scores under each prompt's system prompt: one scoring call per kind."""
        from llm_lifecycle.workflows.rl.reward_model import score_replies

        scores = torch.zeros(len(prompts))
        by_system: dict[str | None, list[int]] = {}
        for i, p in enumerate(prompts):
            by_system.setdefault(self.kind_prompts.get(p.get("kind"), self.system_prompt), []).append(i)
        for system, rows in by_system.items():
            scores[rows] = score_replies(model, tokenizer, [messages_of(prompts[i]) for i in rows],
                                         [replies[i] for i in rows], system)
        return scores

    def score(self, prompts: list[dict], replies: list[str]) -> torch.Tensor:
        helpful = self._scores(self.helpful, self.helpful_tokenizer, prompts, replies)
        if self.safety is None:
            return helpful
        safety = self._scores(self.safety, self.safety_tokenizer, prompts, replies)
        unsafe_prompt = torch.tensor([p.get("kind") == SAFETY_KIND for p in prompts])
        return torch.where(unsafe_prompt | (torch.sigmoid(safety) < self.safety_threshold), safety, helpful)


@dataclass
class Reward:
    """reward(prompts, replies, finished) -> (rewards [N], correct [N]): the weighted sum;
    `finished` is False for a reply cut off by the token limit (no format credit)."""

    cfg: RewardSettings
    models: RewardModels | None = None

    def __call__(self, prompts: list[dict], replies: list[str], finished: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        correct = torch.tensor([correctness_reward(r, p["answer"]) if p.get("answer") else 0.0
                                for p, r in zip(prompts, replies)])
        rewards = c.correct_reward * correct
        if c.format_reward:
            rewards += c.format_reward * torch.tensor([format_reward(r) if p.get("answer") and done else 0.0
                                                       for p, r, done in zip(prompts, replies, finished)])
        if c.think_reward:
            rewards += c.think_reward * torch.tensor([think_format_reward(r) if done else 0.0
                                                      for r, done in zip(replies, finished)])
        if c.language_reward:
            rewards += c.language_reward * torch.tensor([
                language_consistency_reward(user_text(p), r)
                for p, r in zip(prompts, replies)])
        if self.models is not None and c.reward_model_weight:
            rewards += c.reward_model_weight * self.models.score(prompts, replies)
        return rewards, correct
