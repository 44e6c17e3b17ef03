"""Perplexity over non-overlapping windows: the number extend-context and quantize compare."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    token_ids: list[int] | torch.Tensor,
    seq_len: int,
    batch_size: int = 8,
    max_windows: int | None = None,
) -> float:
    """exp(mean next-token NLL) over windows token_ids[k*seq_len : (k+1)*seq_len].

    Each window is scored on its own (its first token is context only, as in the Hugging Face
    perplexity recipe with stride = seq_len), so the model never sees more than seq_len
    positions: ppl at two seq_len values compares context lengths. A tail shorter than
    seq_len is dropped; max_windows caps the number of windows.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    tokens = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    n_windows = tokens.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"perplexity needs at least one window of {seq_len} tokens, got {tokens.numel()}")
    windows = tokens[: n_windows * seq_len].view(n_windows, seq_len)

    device = _device_of(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    try:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = model(batch).logits
            # One row at a time in float32: a [B, T, V] float copy of a big-vocabulary model's
            # logits would cost more memory than the forward pass.
            for row in range(batch.shape[0]):
                total_nll += F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="sum").item()
    finally:
        model.train(was_training)
    return math.exp(total_nll / (n_windows * (seq_len - 1)))


def _device_of(model: torch.nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")
