"""Suites outside lm-eval: `ppl` (perplexity on held-out text) and `long` (passkey retrieval
and perplexity by context length), scored on our own model object.

Passkey retrieval follows Mohtashami & Jaggi (2023, Landmark Attention): a random 5-digit key
stated once inside repeated filler, asked for at the end; the model must generate it. Depths
(where the key sits) and context lengths are swept, so a failure says where it happens.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from llm_lifecycle.evals.local_data import BUILTIN_DATA_DIR, EvalError

PASSKEY_DEPTHS = (0.1, 0.5, 0.9)
_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.\n")
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
_QUESTION = "\nWhat is the pass key? The pass key is"


def heldout_text(data_dir: str | Path | None) -> tuple[str, str]:
    """(text, where): DIR/ppl/*.txt joined, or the shipped WikiText-2 test head (data_dir None/'builtin')."""
    if data_dir is None or str(data_dir) in ("builtin", "hub"):
        path = BUILTIN_DATA_DIR / "ppl" / "wikitext2_test_head.txt"
        return path.read_text(encoding="utf-8"), str(path)
    folder = Path(data_dir).expanduser() / "ppl"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise EvalError(f"ppl: no held-out text found: expected {folder}/*.txt (plain text), "
                        "or --data-dir builtin for the shipped WikiText-2 test excerpt")
    return "\n".join(f.read_text(encoding="utf-8") for f in files), str(folder)


def perplexity_suite(model, tokenizer, data_dir, *, seq_len: int, max_windows: int | None) -> dict[str, float]:
    """eval.ppl.ppl: perplexity over disjoint windows of the model's context length."""
    from llm_lifecycle.evals.perplexity import perplexity

    text, _ = heldout_text(data_dir)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    windows = min(len(ids) // seq_len, max_windows or len(ids))
    if windows < 1:
        raise EvalError(f"ppl: the held-out text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return {"eval.ppl.ppl": perplexity(model, ids, seq_len, max_windows=windows), "eval.ppl.tokens": windows * seq_len}


def context_lengths(max_len: int) -> list[int]:
    """A quarter, a half and all of the context (at least 64 tokens each)."""
    return sorted({max(64, max_len // 4), max(64, max_len // 2), max_len})


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Token ids of a passkey prompt of about `length` tokens with the key at `depth` (0 = start)."""
    fixed = len(tokenizer.encode(_INTRO + _NEEDLE.format(key=key) + _QUESTION).ids)
    per_filler = len(tokenizer.encode(_FILLER * 8).ids) / 8
    n_filler = max(0, int((length - fixed) / per_filler))
    before = round(n_filler * depth)
    text = _INTRO + _FILLER * before + _NEEDLE.format(key=key) + _FILLER * (n_filler - before) + _QUESTION
    return tokenizer.encode(text, add_special_tokens=False).ids[-length:]


@torch.no_grad()
def long_suite(model, tokenizer, data_dir, *, max_len: int, trials: int, seed: int, batch_size: int) -> dict[str, float]:
    """eval.long.passkey_<L> (share of keys generated correctly) and eval.long.ppl_<L> per context length L."""
    from llm_lifecycle.evals.perplexity import perplexity
    from llm_lifecycle.models.generate import generate

    rng = random.Random(seed)
    ids = tokenizer.encode(heldout_text(data_dir)[0], add_special_tokens=False).ids
    metrics = {}
    for length in context_lengths(max_len):
        cases = [(depth, rng.randrange(10_000, 100_000)) for depth in PASSKEY_DEPTHS for _ in range(trials)]
        prompts = [passkey_prompt(tokenizer, length - 8, depth, key) for depth, key in cases]
        answers = []
        for start in range(0, len(prompts), batch_size):
            answers += generate(model, prompts[start : start + batch_size], max_new_tokens=8)
        found = [str(key) in tokenizer.decode(answer) for (_, key), answer in zip(cases, answers)]
        metrics[f"eval.long.passkey_{length}"] = sum(found) / len(found)
        if len(ids) >= length:
            metrics[f"eval.long.ppl_{length}"] = perplexity(model, ids, length, batch_size=batch_size, max_windows=8)
    return metrics
