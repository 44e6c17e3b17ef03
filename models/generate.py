"""Batched autoregressive generation with the KV cache.

Prompts of different lengths are left-padded into one batch; the cache's padding mask
hides the pads, and since RoPE depends only on relative positions the shift changes
nothing. Each row stops at its first stop id or stop string; the batch stops when every
row has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from llm_lifecycle.models.decoder import Decoder, KVCache


@torch.no_grad()
def generate(
    model: Decoder,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids=(),
    seed: int | None = None,
    stop_strings: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (the stop token that ended a row is not included; the
    tokens that completed a stop string are, see `generate_text` for cutting the text).

    temperature 0 is greedy; otherwise sample from softmax(logits / temperature), cut to the
    smallest set of tokens whose probability reaches `top_p` (nucleus sampling). Stop
    strings need `decode` (token ids -> text).
    """
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function (token ids -> text)")
    # A stop string of n characters spans at most n tokens: decode only that tail per step.
    tail = max((len(s) for s in stop_strings), default=0) + 1
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. <|endoftext|>) to condition on")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    real = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        real[row, width - len(prompt) :] = True
    cache = KVCache(model.cfg.n_layers, key_padding=None if bool(real.all()) else real)

    stop = set(stop_ids)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    logits = model(ids, kv_cache=cache).logits[:, -1]
    for step in range(max_new_tokens):
        next_ids = _pick(logits.float(), temperature, top_p, generator)
        for row, token in enumerate(next_ids.tolist()):
            if finished[row]:
                continue
            if token in stop:
                finished[row] = True
            else:
                outputs[row].append(token)
                if stop_strings and any(s in decode(outputs[row][-tail:]) for s in stop_strings):
                    finished[row] = True
        if all(finished) or step == max_new_tokens - 1:
            break
        logits = model(next_ids[:, None], kv_cache=cache).logits[:, -1]
    model.train(was_training)
    return outputs


def generate_text(
    model: Decoder,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    seed: int | None = None,
) -> list[str]:
    """Continuations of text prompts with a `tokenizers.Tokenizer`, each cut before its first
    stop string; special tokens among `stop` (e.g. "<|im_end|>") stop by id."""
    special = [t for t in stop if tokenizer.token_to_id(t) is not None]
    strings = [s for s in stop if s not in special]
    ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    outs = generate(model, ids, max_new_tokens, temperature, top_p, stop_ids=[tokenizer.token_to_id(t) for t in special],
                    seed=seed, stop_strings=strings, decode=tokenizer.decode)
    texts = [tokenizer.decode(o) for o in outs]
    return [min((t.split(s, 1)[0] for s in strings), key=len, default=t) for t in texts]


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """One token id per row from logits [B, V]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
