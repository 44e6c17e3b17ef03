"""Deduplication: exact (after normalisation) and near-duplicate (MinHash-LSH).

Near-duplicates follow the GPT-3 / Gopher / RefinedWeb practice: word 5-gram shingles
(character 5-grams for Chinese and Japanese, which put no spaces between words), a
MinHash signature per document, LSH bands to find candidates, and each candidate confirmed
by its estimated Jaccard similarity, so a chance band collision removes nothing.

The MinHash library is rensa (R-MinHash, Rust): on benches/dedup.py it computed the same
decisions as datasketch at many times its speed (docs/benchmarks.md, issue 4).
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from typing import Iterable

from llm_lifecycle.workflows.runner.stage import Progress, SilentProgress

# Han ideographs (with extensions and compatibility forms) and Japanese kana: scripts
# written without spaces between words.
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
SHINGLE = 5  # n of the n-grams (GPT-3 and RefinedWeb use 5-grams)
BATCH = 4096  # documents hashed per call into rensa (bounded memory, parallel in Rust)


def cjk_fraction(text: str) -> float:
    visible = sum(map(len, text.split()))
    return len(CJK.findall(text)) / visible if visible else 0.0


def is_cjk(text: str) -> bool:
    """True for text mostly in a script without spaces between words (Chinese, Japanese)."""
    return cjk_fraction(text) >= 0.3


def normalize_for_dedup(text: str) -> str:
    """NFKC, lower case, whitespace collapsed: what 'the same text' means for exact dedup."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def shingles(normalized: str, n: int = SHINGLE) -> list[str]:
    """Character n-grams for CJK text, word n-grams otherwise (the MinHash features)."""
    if is_cjk(normalized):
        units: list[str] = list(normalized.replace(" ", ""))
        sep = ""
    else:
        units = normalized.split()
        sep = " "
    return list({sep.join(units[i : i + n]) for i in range(max(1, len(units) - n + 1))})


def exact_duplicates(normalized: list[str]) -> dict[int, int]:
    """{index of a duplicate: index of the first document with the same normalised text}."""
    first: dict[bytes, int] = {}
    duplicates = {}
    for i, text in enumerate(normalized):
        digest = hashlib.sha1(text.encode("utf-8")).digest()
        j = first.setdefault(digest, i)
        if j != i:
            duplicates[i] = j
    return duplicates


def lsh_bands(threshold: float, num_perm: int, fn_weight: float = 0.9) -> int:
    """The band count b (with b * r = num_perm) minimising the weighted probability mass of
    false positives below `threshold` and false negatives above it (Leskovec et al., MMDS
    ch. 3). False negatives weigh more: a missed duplicate stays in the data, while a false
    candidate only costs one signature comparison."""

    def area(f, lo: float, hi: float, steps: int = 200) -> float:
        width = (hi - lo) / steps
        return sum(f(lo + (k + 0.5) * width) for k in range(steps)) * width

    best, best_error = 1, math.inf
    for b in (b for b in range(1, num_perm + 1) if num_perm % b == 0):
        r = num_perm // b
        fp = area(lambda s: 1 - (1 - s**r) ** b, 0.0, threshold)
        fn = area(lambda s: (1 - s**r) ** b, threshold, 1.0)
        error = (1 - fn_weight) * fp + fn_weight * fn
        if error < best_error:
            best, best_error = b, error
    return best


def near_duplicates(
    normalized: list[str],
    threshold: float = 0.8,
    num_perm: int = 128,
    seed: int = 1,
    progress: Progress | None = None,
) -> dict[int, int]:
    """{index of a near-duplicate: index of the earlier kept document it duplicates}.

    Documents are taken in order and the first of a group is kept, so the result does not
    depend on how the work is batched.
    """
    from rensa import RMinHash, RMinHashLSH

    progress = progress or SilentProgress()
    lsh = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=lsh_bands(threshold, num_perm))
    kept: dict[int, RMinHash] = {}
    duplicates: dict[int, int] = {}
    with progress.task("near-dedup (MinHash-LSH)", total=len(normalized)) as task:
        for start in range(0, len(normalized), BATCH):
            texts = normalized[start : start + BATCH]
            sketches = RMinHash.from_token_sets([shingles(t) for t in texts], num_perm=num_perm, seed=seed)
            for i, sketch in enumerate(sketches, start):
                match = next((j for j in sorted(lsh.query(sketch)) if kept[j].jaccard(sketch) >= threshold), None)
                if match is None:
                    lsh.insert(i, sketch)
                    kept[i] = sketch
                else:
                    duplicates[i] = match
            task.advance(len(texts))
    return duplicates


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """Exact Jaccard similarity of two shingle sets."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a or b else 1.0
