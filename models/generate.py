"""Batched autoregressive generation, served the way gpt-fast and vLLM serve models.

- The KV cache is allocated once for the whole generation (StaticKVCache): nothing is
  concatenated per step, and every decode step has the same shapes, so with `compile=True`
  the one-token step runs as one torch.compile graph.
- Prompts of different lengths need no padding: each cache row keeps its own length and
  positions. Prompts of equal length are prefilled together, and the prefill computes the
  logits of the last position only.
- Sampling (greedy, temperature, top-p) is one batched op per step; each row stops at its
  first stop id or stop string. Once half the rows have stopped they leave the batch, cache
  rows included, so finished rows cost at most as much as the rows still running.
- `steer` sees each step's picks and may replace some: a forced token (a thinking budget's
  end-of-thought, say) is emitted and is what that row's model reads next.
  `thinking_budget` makes the steer of Qwen3's thinking budget.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from llm_lifecycle.models.chat_markup import THINK_END, THINK_START
from llm_lifecycle.models.decoder import Decoder, StaticKVCache

# steer(step, rows, picked) -> the ids to emit: `rows` holds the prompt index of each entry
# of `picked` [n], the rows still generating.
Steer = Callable[[int, list[int], torch.Tensor], torch.Tensor]


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
    steer: Steer | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """New tokens for each prompt (the stop token that ended a row is not included; the
    tokens that completed a stop string are, see `generate_text` for cutting the text).

    temperature 0 is greedy; otherwise sample from softmax(logits / temperature), cut to the
    smallest set of tokens whose probability reaches `top_p` (nucleus sampling). Stop
    strings need `decode` (token ids -> text). `compile` runs the decode step through
    torch.compile: worth its one-off compile time (tens of seconds on a CPU) for long or
    repeated generations.
    """
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function (token ids -> text)")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. <|endoftext|>) to condition on")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    # A stop string of n characters spans at most n tokens: decode only that tail per step.
    tail = max((len(s) for s in stop_strings), default=0) + 1
    stop = set(stop_ids)
    step_fn = _compiled_decode_step if compile else _decode_step
    was_training = model.training
    model.eval()
    try:
        cache = model.new_static_kv_cache(len(prompts), max(map(len, prompts)) + max_new_tokens - 1)
        logits = _prefill(model, prompts, cache)
        outputs: list[list[int]] = [[] for _ in prompts]
        rows = list(range(len(prompts)))  # the prompt of each cache row
        running = [True] * len(rows)
        for step in range(max_new_tokens):
            ids = _pick(logits.float(), temperature, top_p, generator)
            if steer is not None:
                ids = steer(step, rows, ids)
            for i, (row, token) in enumerate(zip(rows, ids.tolist())):
                if not running[i]:
                    continue
                if token in stop:
                    running[i] = False
                    continue
                outputs[row].append(token)
                if stop_strings and any(s in decode(outputs[row][-tail:]) for s in stop_strings):
                    running[i] = False
            n_running = sum(running)
            if n_running == 0 or step == max_new_tokens - 1:
                break
            if n_running <= len(rows) // 2:
                keep = [i for i, r in enumerate(running) if r]
                index = torch.tensor(keep, device=device)
                cache, ids = cache.select(index), ids[index]
                rows, running = [rows[i] for i in keep], [True] * len(keep)
            logits = step_fn(model, ids, cache)
    finally:
        model.train(was_training)
    return outputs


class ThinkingBudget:
    """A steer that lets each row think at most `budget` tokens (Qwen3's thinking budget): a
    row that has generated `budget` tokens after its `<think>` without a `</think>` is made to
    emit `</think>` next, and goes on to its answer (the model writes the blank line after it
    as it learned to). Thinking tokens are those strictly between `<think>` and `</think>`.
    One instance per `generate` call: it keeps each row's count."""

    def __init__(self, budget: int, open_id: int, close_id: int):
        self.budget, self.open_id, self.close_id = budget, open_id, close_id
        self.thought: dict[int, int] = {}  # prompt index -> thinking tokens so far, while its block is open
        self.closed: set[int] = set()

    def __call__(self, step: int, rows: list[int], picked: torch.Tensor) -> torch.Tensor:
        picked = picked.clone()
        for i, row in enumerate(rows):
            if row in self.closed:
                continue
            if row not in self.thought:
                if int(picked[i]) == self.open_id:
                    self.thought[row] = 0
            elif int(picked[i]) == self.close_id or self.thought[row] >= self.budget:
                picked[i] = self.close_id
                self.closed.add(row)
            else:
                self.thought[row] += 1
        return picked


def thinking_budget(tokenizer, budget: int) -> ThinkingBudget | None:
    """The steer that caps each reply's thinking at `budget` tokens; None for budget 0 (no cap).
    The tokenizer must have <think> and </think> as whole tokens (ours from tokenizer-train,
    Qwen3's)."""
    if budget < 0:
        raise ValueError(f"thinking_budget must be >= 0 (0: no limit), got {budget}")
    if budget == 0:
        return None
    open_id, close_id = tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END)
    if open_id is None or close_id is None:
        raise ValueError(f"a thinking budget needs a tokenizer with {THINK_START} and {THINK_END} tokens, "
                         "and this one has none")
    return ThinkingBudget(budget, open_id, close_id)


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


def _prefill(model: Decoder, prompts: list[list[int]], cache: StaticKVCache) -> torch.Tensor:
    """Run each group of equal-length prompts at once (no padding, the fused causal kernel)
    and copy its keys and values into its rows of `cache`; the last logits of every row [B, V]."""
    device = cache.lengths.device
    groups: dict[int, list[int]] = defaultdict(list)
    for row, prompt in enumerate(prompts):
        groups[len(prompt)].append(row)
    last = None
    for rows in groups.values():
        part = model.new_kv_cache()
        logits = model(torch.tensor([prompts[r] for r in rows], device=device), kv_cache=part, logits_to_keep=1).logits
        index = torch.tensor(rows, device=device)
        if last is None:
            last = logits.new_empty(len(prompts), logits.size(-1))
        last[index] = logits[:, -1]
        cache.fill(index, part)
    return last


def _decode_step(model: Decoder, ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """One new token per row [B] through the model; its logits [B, V]."""
    return model(ids[:, None], kv_cache=cache).logits[:, -1]


# Dynamic from the first compile: the batch (rows leave as they finish), the cache length and
# its visible prefix (StaticKVCache.bound, one more each step) all change. Two compiles serve a
# generation (the second when the prefix reaches the buffer's end and becomes contiguous);
# left to mark shapes dynamic on recompiles, torch.compile took three.
_compiled_decode_step = torch.compile(_decode_step, dynamic=True)


_NUCLEUS_RANKED = 256


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """One token id per row from logits [B, V]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p == 1:
        return _draw(probs, generator)
    # The nucleus usually lies within the most likely few hundred tokens: rank those only
    # (topk: 2.8 ms where a full sort took 14.3 ms at 64 x 4096), the whole vocabulary when
    # some row's leading tokens fall short of top_p.
    sorted_probs, order = probs.topk(min(_NUCLEUS_RANKED, probs.size(-1)), dim=-1)
    if bool((sorted_probs.sum(dim=-1) < top_p).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    return order.gather(-1, _draw(sorted_probs.masked_fill(drop, 0.0), generator)[:, None]).squeeze(-1)


def _draw(probs: torch.Tensor, generator) -> torch.Tensor:
    """One index per row of `probs` [B, V] (non-negative, not necessarily normalised), by the
    inverse of its cumulative sum at one uniform draw per row. torch.multinomial draws an
    exponential per vocabulary entry instead: at batch 64 x 4096 that RNG alone cost more
    than the rest of a 4M model's decode step."""
    cdf = probs.cumsum(dim=-1)
    # u in (0, 1], so the target lies in (0, total]: the first index whose cdf reaches it has
    # a nonzero probability (the cdf rose there).
    u = 1 - torch.rand(probs.size(0), 1, generator=generator, device=probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1)
