"""GLM's pretraining objective: autoregressive blank infilling (Du et al., GLM; ChatGLM).

A window of text has spans (Poisson lengths, mean 3, ~15% of the tokens) cut out:

    Part A  the text with each span replaced by one [MASK]; it attends to itself both ways.
    Part B  the spans in shuffled order, each as [sop] span, predicting span [eop]; each
            token attends to all of Part A and causally to Part B up to itself.

Positions are 2D: the first id is the position in Part A (for a span token: the position
of its [MASK]), the second the position inside the span (0 throughout Part A). The
decoder takes them as `position_ids` [B, 2, L] and the mask as `attn_mask` [B, L, L];
its config needs `rope_2d: true`. Only Part B tokens carry targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

GLM_TOKENS = ("[MASK]", "[sop]", "[eop]")


@dataclass(frozen=True)
class GLMTokens:
    mask: int
    sop: int
    eop: int
    pad: int


def add_glm_tokens(tokenizer) -> GLMTokens:
    """Add GLM's [MASK] [sop] [eop] to a `tokenizers.Tokenizer` (after its vocabulary) and
    return their ids; padding reuses <|endoftext|>."""
    tokenizer.add_special_tokens([t for t in GLM_TOKENS if tokenizer.token_to_id(t) is None])
    mask, sop, eop = (tokenizer.token_to_id(t) for t in GLM_TOKENS)
    return GLMTokens(mask=mask, sop=sop, eop=eop, pad=tokenizer.token_to_id("<|endoftext|>"))


def max_spans(window: int, mask_ratio: float, mean_span: float) -> int:
    return int(np.ceil(window * mask_ratio / mean_span)) + 1


def packed_length(window: int, mask_ratio: float, mean_span: float) -> int:
    """Every example is padded to this length: each span adds a [MASK] and a [sop]."""
    return window + 2 * max_spans(window, mask_ratio, mean_span)


def _sample_spans(n_tokens: int, rng: np.random.Generator, mask_ratio: float, mean_span: float) -> list[tuple[int, int]]:
    """Non-overlapping, non-adjacent (start, length) spans covering ~mask_ratio of the tokens."""
    budget, limit = max(1, round(n_tokens * mask_ratio)), max_spans(n_tokens, mask_ratio, mean_span)
    lengths: list[int] = []
    while sum(lengths) < budget and len(lengths) < limit:
        lengths.append(int(max(1, min(rng.poisson(mean_span), budget - sum(lengths)))))
    # Spread the unmasked tokens over the n + 1 gaps (stars and bars), at least 1 between spans.
    free = n_tokens - sum(lengths) - (len(lengths) - 1)
    if free < 0:
        raise ValueError(f"a window of {n_tokens} tokens is too short for blank infilling")
    cuts = np.sort(rng.integers(0, free + 1, size=len(lengths)))
    spans, start = [], 0
    for j, length in enumerate(lengths):
        start += int(cuts[j] - (cuts[j - 1] if j else 0)) + (1 if j else 0)
        spans.append((start, length))
        start += length
    return spans


def blank_infilling(tokens: np.ndarray, rng: np.random.Generator, ids: GLMTokens, length: int,
                    mask_ratio: float = 0.15, mean_span: float = 3.0):
    """One example: (input_ids [L], targets [L], position_ids [2, L], attn_mask Bool[L, L])."""
    tokens = [int(t) for t in tokens]
    spans = _sample_spans(len(tokens), rng, mask_ratio, mean_span)
    part_a, mask_at, prev = [], [], 0
    for start, span_len in spans:
        part_a += tokens[prev:start]
        mask_at.append(len(part_a))
        part_a.append(ids.mask)
        prev = start + span_len
    part_a += tokens[prev:]

    inputs, targets = list(part_a), [-100] * len(part_a)
    positions, span_positions = list(range(len(part_a))), [0] * len(part_a)
    for j in rng.permutation(len(spans)):
        start, span_len = spans[j]
        span = tokens[start : start + span_len]
        inputs += [ids.sop, *span]
        targets += [*span, ids.eop]
        positions += [mask_at[j]] * (span_len + 1)
        span_positions += list(range(1, span_len + 2))
    n, n_a = len(inputs), len(part_a)
    if n > length:
        raise ValueError(f"blank-infilling example of {n} tokens does not fit length {length}")

    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[:n, :n_a] = True  # everyone sees Part A (Part A bidirectionally)
    mask[n_a:n, n_a:n] = torch.ones(n - n_a, n - n_a, dtype=torch.bool).tril()  # Part B: causal
    mask[torch.arange(n, length), torch.arange(n, length)] = True  # padding sees only itself
    pad = length - n
    return (
        torch.tensor(inputs + [ids.pad] * pad),
        torch.tensor(targets + [-100] * pad),
        torch.tensor([positions + [0] * pad, span_positions + [0] * pad]),
        mask,
    )


def glm_batches(windows: Iterator[tuple[torch.Tensor, torch.Tensor]], ids: GLMTokens, seed: int, start_step: int,
                mask_ratio: float, mean_span: float) -> Iterator[tuple[torch.Tensor, ...]]:
    """Turn (inputs, targets) token windows into blank-infilling batches
    (input_ids, targets, position_ids [B, 2, L], attn_mask [B, L, L]); the spans of micro-step
    i depend only on (seed, i), so a resumed run sees the same examples."""
    for step, (inputs, _) in enumerate(windows, start=start_step):
        rng = np.random.default_rng([seed, step])
        length = packed_length(inputs.size(1), mask_ratio, mean_span)
        rows = [blank_infilling(row.numpy(), rng, ids, length, mask_ratio, mean_span) for row in inputs]
        yield tuple(torch.stack(parts) for parts in zip(*rows))
