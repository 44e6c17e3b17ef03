"""Suites outside lm-eval: `ppl` (perplexity on held-out text) and `long` (passkey retrieval
and perplexity by context length), scored on our own model object. The passkey probe is the
one extend-context reports (evals/passkey.py), here with the held-out text as filler and swept
over a quarter, a half and all of the model's context.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llm_lifecycle.evals.local_data import BUILTIN_DATA_DIR, EvalError


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
    """A quarter, a half and all of the context, none under 128 tokens (the passkey's own lines
    take ~60 tokens of a small vocabulary) unless the whole context is shorter."""
    return sorted({min(max_len, max(128, max_len // k)) for k in (4, 2, 1)})


@torch.no_grad()
def long_suite(model, tokenizer, data_dir, *, max_len: int, trials: int, seed: int, batch_size: int) -> dict[str, float]:
    """Per context length L: eval.long.passkey_<L> (share of keys retrieved), eval.long.passkey_logprob_<L>
    (mean log p per key token) and eval.long.ppl_<L>."""
    from llm_lifecycle.evals.passkey import passkey_retrieval
    from llm_lifecycle.evals.perplexity import perplexity

    ids = tokenizer.encode(heldout_text(data_dir)[0], add_special_tokens=False).ids

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    metrics = {}
    for length in context_lengths(max_len):
        try:
            probe = passkey_retrieval(model, encode, ids, length, trials=trials, seed=seed)
        except ValueError as err:
            raise EvalError(f"long: {err}") from None
        metrics[f"eval.long.passkey_{length}"] = probe["accuracy"]
        metrics[f"eval.long.passkey_logprob_{length}"] = probe["key_logprob"]
        if len(ids) >= length:
            metrics[f"eval.long.ppl_{length}"] = perplexity(model, ids, length, batch_size=batch_size, max_windows=8)
    return metrics
