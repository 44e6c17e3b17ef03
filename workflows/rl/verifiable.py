"""Verifiable rewards for GSM8K-style problems (Qwen3, DeepSeek-R1 use rule-based rewards
instead of a learned reward model where an answer can be checked) and the held-out
accuracy that goes with them.

A problem is {"question", "answer"} with the reference answer's last line `#### N`. A
completion is correct when the number after its `####` equals N (lm-eval's gsm8k
"strict-match": commas and a trailing period dropped). The format reward pays for ending
with a `#### N` line, so a policy that has not yet got the arithmetic right still learns
where the answer goes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from llm_lifecycle.workflows.refs import read_data_files
from llm_lifecycle.workflows.runner.settings import AT_LEAST_1, Settings, setting
from llm_lifecycle.workflows.runner.stage import StageContext, UserError

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

_FINAL = re.compile(r"#### (-?[0-9.,]+)")
_FORMAT = re.compile(r"\n#### -?[0-9][0-9.,]*\s*\Z")


def extract_answer(text: str) -> str | None:
    """The number after the first `#### `, normalised ('1,200.' -> '1200'), or None."""
    match = _FINAL.search(text)
    if match is None:
        return None
    number = match.group(1).replace(",", "").rstrip(".")
    return number or None


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def correctness_reward(completion: str, reference: str) -> float:
    """1 when the completion's final number equals the reference's, else 0."""
    got, want = extract_answer(completion), extract_answer(reference)
    return float(got is not None and want is not None and _same_number(got, want))


def format_reward(completion: str) -> float:
    """1 when the completion ends with a `#### N` line on its own, else 0."""
    return float(bool(_FORMAT.search(completion.rstrip())))


def load_problems(path) -> list[dict[str, str]]:
    """{"question", "answer"} records (GSM8K jsonl, optionally gzipped) from `path`."""
    from llm_lifecycle.workflows.data.chat_data import read_records

    records = read_records(path)
    bad = next((i for i, r in enumerate(records) if not {"question", "answer"} <= r.keys()), None)
    if bad is not None:
        raise ValueError(f"{path}: record {bad} lacks 'question'/'answer' (GSM8K format expected)")
    if not all(extract_answer(r["answer"]) is not None for r in records):
        raise ValueError(f"{path}: every answer must end with a '#### N' line (GSM8K format)")
    return [{"question": r["question"], "answer": r["answer"]} for r in records]


def prompt_ids(tokenizer, question: str, system_prompt: str | None, thinking: str = "") -> list[int]:
    """The question as a ChatML user turn, with Qwen3's ` /think` or ` /no_think` when asked."""
    from llm_lifecycle.models.chat_markup import with_thinking_flag
    from llm_lifecycle.workflows.data.chat_data import encode_prompt

    messages = with_thinking_flag([{"role": "user", "content": question}], thinking)
    return encode_prompt(tokenizer, messages, default_system=system_prompt)


def stop_ids(tokenizer) -> list[int]:
    return [i for i in (tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")) if i is not None]


@torch.no_grad()
def accuracy(model, tokenizer, problems: list[dict[str, str]], system_prompt: str | None,
             max_new_tokens: int = 96, batch_size: int = 64) -> dict[str, float]:
    """Greedy exact-match accuracy (and format rate) on `problems`, prompted as a ChatML user turn."""
    from llm_lifecycle.models.generate import generate

    correct = formatted = 0.0
    stops = stop_ids(tokenizer)
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [prompt_ids(tokenizer, p["question"], system_prompt) for p in chunk]
        outputs = generate(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stops)
        for p, ids in zip(chunk, outputs):
            text = tokenizer.decode(ids)
            correct += correctness_reward(text, p["answer"])
            formatted += format_reward(text)
    n = max(1, len(problems))
    return {"accuracy": correct / n, "format_rate": formatted / n}


@torch.no_grad()
def thinking_mode_rates(model, tokenizer, problems: list[dict[str, str]], system_prompt: str | None,
                        max_new_tokens: int = 96, batch_size: int = 64) -> dict[str, float]:
    """How well greedy replies follow Qwen3's soft switch on `problems`: the share of replies
    asked with ` /think` that open with a complete (closed) non-empty think block, the share
    asked with ` /no_think` that open with the empty one, and the exact-match accuracy in each mode."""
    from llm_lifecycle.models.generate import generate
    from llm_lifecycle.models.chat_markup import think_block

    stops = stop_ids(tokenizer)
    rates = {}
    for mode in ("think", "no_think"):
        followed = correct = 0.0
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            prompts = [prompt_ids(tokenizer, p["question"], system_prompt, thinking=mode) for p in chunk]
            for p, ids in zip(chunk, generate(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stops)):
                text = tokenizer.decode(ids)
                block = think_block(text)
                followed += block is not None and (block != "") == (mode == "think")
                correct += correctness_reward(text, p["answer"])
        n = max(1, len(problems))
        rates.update({f"{mode}_followed": followed / n, f"{mode}_accuracy": correct / n})
    return rates


# ---- stage helpers (sft and rl measure alike) ----------------------------------------------


def load_problem_files(uris: list[str], where: str) -> list[dict]:
    problems = read_data_files(uris, where, load_problems)
    if not problems:
        raise UserError(f"{where}: no problems; give GSM8K-format jsonl files")
    return problems


@dataclass
class AnswerEvalSettings(Settings):
    """Held-out answer accuracy before and after a post-training stage (sft, rl, distill)."""

    eval_data: str = setting("", "GSM8K-format problems for greedy exact-match accuracy before and after "
                                 "(\"\": not measured)", files=True)
    eval_n: int = setting(200, "how many of eval_data's problems", limit=AT_LEAST_1)
    max_new_tokens: int = setting(96, "tokens generated per answer (also bounds rl's samples)", limit=AT_LEAST_1)


def heldout_answer_accuracy(ctx: StageContext, cfg: AnswerEvalSettings, model, tokenizer,
                            system_prompt: str) -> dict[str, float]:
    """Greedy exact-match accuracy on `eval_data` (GSM8K format), {} when none is set.
    Shared by the post-training stages so the numbers before and after each are measured alike."""
    if not cfg.eval_data:
        return {}
    problems = load_problem_files([cfg.eval_data], f"stages.{ctx.stage}.eval_data")[: cfg.eval_n]
    return accuracy(model, tokenizer, problems, system_prompt, max_new_tokens=cfg.max_new_tokens)
