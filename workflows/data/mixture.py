"""Data schedules: which mixture of document groups each part of a training stage reads.

The reports train in phases: Qwen2.5 and InternLM2 end pretraining on knowledge-dense and
high-quality data, and extend the context on long documents. A recipe says so with
`schedule`, a list of phases in a training stage's config:

    pretrain:
      schedule:
        - {until: 0.8, mixture: {general: 1.0}}                  # first 80 % of the steps
        - {until: 1.0, mixture: {general: 0.3, knowledge: 0.7}}  # the rest
    extend-context:
      schedule:
        - {until: 1.0, mixture: {long: 0.7, general: 0.3}, min_doc_tokens: 512}

Groups are data-fetch's `group` of each source. An empty schedule reads the whole token
stream uniformly, as before schedules existed. Batches stay a pure function of
(seed, micro-step), so resumed runs read the same data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from llm_lifecycle.workflows.runner.stage import UserError


@dataclass(frozen=True)
class Phase:
    until: float  # the fraction of the stage's steps at which this phase ends
    mixture: dict[str, float]  # group -> weight; empty: every group by its size
    min_doc_tokens: int = 0  # only documents at least this long (long-context phases)


def parse_schedule(items: Any, key: str) -> list[Phase]:
    if not isinstance(items, list):
        raise UserError(f"{key}: expected a list of phases like {{until: 1.0, mixture: {{general: 1.0}}}}")
    phases: list[Phase] = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(item, dict) or set(item) - {"until", "mixture", "min_doc_tokens"}:
            raise UserError(f"{where}: expected a mapping with until, mixture and optionally min_doc_tokens")
        until = item.get("until", 1.0)
        if isinstance(until, bool) or not isinstance(until, (int, float)) or not 0 < until <= 1:
            raise UserError(f"{where}.until: expected a fraction of the steps in (0, 1], got {until!r}")
        mixture = item.get("mixture") or {}
        if not isinstance(mixture, dict) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 and math.isfinite(w)
            for w in mixture.values()
        ):
            raise UserError(f"{where}.mixture: expected {{group: weight >= 0}}, got {mixture!r}")
        if mixture and sum(mixture.values()) <= 0:
            raise UserError(f"{where}.mixture: the weights sum to 0")
        min_doc_tokens = item.get("min_doc_tokens", 0)
        if isinstance(min_doc_tokens, bool) or not isinstance(min_doc_tokens, int) or min_doc_tokens < 0:
            raise UserError(f"{where}.min_doc_tokens: expected an integer >= 0, got {min_doc_tokens!r}")
        if phases and until <= phases[-1].until:
            raise UserError(f"{where}.until: phases must end in increasing order ({until} <= {phases[-1].until})")
        phases.append(Phase(float(until), {str(k): float(v) for k, v in mixture.items()}, min_doc_tokens))
    if phases and phases[-1].until != 1.0:
        raise UserError(f"{key}: the last phase must end at until: 1.0 (got {phases[-1].until})")
    return phases


def phase_at(schedule: list[Phase], step: int, steps: int) -> Phase | None:
    """The phase optimizer step `step` of `steps` belongs to (None without a schedule)."""
    for phase in schedule:
        if step < phase.until * steps:
            return phase
    return schedule[-1] if schedule else None


def scheduled_batches(
    shards, schedule: list[Phase], settings, seed: int, start_micro_step: int, seq_len: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless micro-batches from `start_micro_step` on, each from its phase's mixture."""
    seq_len = seq_len or settings.seq_len
    for phase in schedule:  # fail before training starts, not at the phase change
        if phase.mixture or phase.min_doc_tokens:
            shards.mixture_sampler(phase.mixture or None, phase.min_doc_tokens)
    micro = start_micro_step
    while True:
        phase = phase_at(schedule, micro // settings.grad_accum, settings.steps)
        if phase is None:
            yield shards.batch(micro, settings.batch_size, seq_len, seed)
        else:
            yield shards.batch(micro, settings.batch_size, seq_len, seed, phase.mixture or None, phase.min_doc_tokens)
        micro += 1
