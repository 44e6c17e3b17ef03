"""Reward model: the SFT model with a scalar head, trained on preference pairs with the binary
ranking loss with a margin of Llama 2: -log σ(r(x, y_chosen) - r(x, y_rejected) - m).

The score is the head read at the last token (`pooling="last"`, InstructGPT and Llama 2), or
its mean over the reply's tokens (`"mean"`): measured on the shipped hh-rlhf pairs, a 0.16 M
model's last token does not learn what a bag of words over the reply does (held-out 0.52 vs
0.58, docs/benchmarks.md), so small models may score the whole reply instead."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llm_lifecycle.workflows.data.chat_data import Encoded, _EpochOrder
from llm_lifecycle.workflows.rl.policy_opt import ValueHead, pad_id_of

HEAD_FILE = "value_head.safetensors"
POOLINGS = ("last", "mean")


class RewardModel(nn.Module):
    def __init__(self, backbone, max_len: int | None = None, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"reward model pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        self.backbone = backbone
        self.head = ValueHead(backbone.cfg.dim)
        self.pooling = pooling
        # Scoring cuts chats where training cut its pairs (rl's seq_len), so it reads the same token.
        self.max_len = max_len or backbone.cfg.max_seq_len

    def begin_global_batch(self) -> None:  # the trainer's per-step hook, for MoE balance counts
        if hasattr(self.backbone, "begin_global_batch"):
            self.backbone.begin_global_batch()

    def forward(self, ids: torch.Tensor, last: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B] of right-padded sequences ids [B, T] whose last real token is at `last` [B]
        and whose reply starts at `first` [B] (needed by mean pooling only)."""
        values = self.head(self.backbone(ids).hidden)
        if self.pooling == "last":
            return values.gather(1, last[:, None]).squeeze(1)
        if first is None:
            raise ValueError("mean pooling needs where each reply starts (first)")
        positions = torch.arange(ids.size(1), device=ids.device)[None, :]
        reply = (positions >= first[:, None]) & (positions <= last[:, None])
        return (values * reply).sum(1) / reply.sum(1)


def ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float) -> tuple[torch.Tensor, dict]:
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    chosen, rejected = chosen.detach(), rejected.detach()
    return loss, {"rm_accuracy": float(pair_accuracy(chosen, rejected)), "rm_margin": float((chosen - rejected).mean())}


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked right; a tie counts half."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean()


def reply_start(mask: list[int]) -> int:
    """Index of an encoded chat's first reply token (its first trained one)."""
    return mask.index(1) if 1 in mask else len(mask) - 1


class PairBatches:
    """(ids [2B, T], last [2B], first [2B]): the B chosen sequences, then their B rejected ones;
    where each ends and where its reply starts."""

    def __init__(self, pairs: list[tuple[Encoded, Encoded]], batch_size: int, seed: int, pad_id: int):
        self.pairs, self.batch_size, self.pad_id = pairs, batch_size, pad_id
        self._order = _EpochOrder(len(pairs), seed)

    def batch(self, step: int, indices: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        picked = [self.pairs[i] for i in (indices if indices is not None else self._order.indices(step, self.batch_size))]
        return _rows([c for c, _ in picked] + [r for _, r in picked], self.pad_id)

    def batches(self, start: int = 0):
        step = start
        while True:
            yield self.batch(step)
            step += 1


def _rows(encoded: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [N, T] right-padded, last [N], first [N]) of encoded chats (ids, mask)."""
    ids = torch.full((len(encoded), max(len(row) for row, _ in encoded)), pad_id, dtype=torch.long)
    for i, (row, _) in enumerate(encoded):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(row) - 1 for row, _ in encoded]), torch.tensor([reply_start(m) for _, m in encoded])


def rm_loss(margin: float):
    def loss_fn(model: RewardModel, batch):
        ids, last, first = batch
        scores = model(ids, last, first)
        n = ids.size(0) // 2
        return ranking_loss(scores[:n], scores[n:], margin)

    return loss_fn


@torch.no_grad()
def heldout_accuracy(model: RewardModel, data: PairBatches) -> dict[str, float]:
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(data.pairs), data.batch_size):
        ids, last, first = data.batch(0, list(range(start, min(start + data.batch_size, len(data.pairs)))))
        scores = model(ids.to(device), last.to(device), first.to(device))
        n = ids.size(0) // 2
        chosen.append(scores[:n].cpu())
        rejected.append(scores[n:].cpu())
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"rm_accuracy": float(pair_accuracy(c, r)), "rm_margin": float((c - r).mean())}


@torch.no_grad()
def score_replies(rm: RewardModel, tokenizer, prompts: list[list[dict]], replies: list[str],
                  system_prompt: str | None, batch_size: int = 16) -> torch.Tensor:
    """One score per (prompt conversation, assistant reply), read where training read it: the
    last token of the ChatML chat, cut to the model's length as training cut its pairs (the
    prompt's oldest tokens first: chat_data.encode_reply).
    `system_prompt` goes first when a conversation brings no system turn (the SFT model's
    prompt, or a conditional reward model's domain prompt)."""
    from llm_lifecycle.workflows.data.chat_data import encode_reply

    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    rm.eval()
    device = next(rm.parameters()).device
    max_len, pad = rm.max_len, pad_id_of(tokenizer)
    rows = [encode_reply(tokenizer, prompt, reply, max_len, default_system=system_prompt)
            for prompt, reply in zip(prompts, replies)]
    scores = []
    for start in range(0, len(rows), batch_size):
        ids, last, first = _rows(rows[start : start + batch_size], pad)
        scores.append(rm(ids.to(device), last.to(device), first.to(device)).float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def save_reward_model(path: Path, model: RewardModel, tokenizer, extra: dict) -> Path:
    """Our model directory (the backbone, still a language model) plus the head's weights."""
    from safetensors.torch import save_model

    from llm_lifecycle.models.checkpoint import save_model_dir

    model = model.cpu()
    save_model_dir(path, model.backbone, tokenizer, extra={**extra, "reward_head": HEAD_FILE, "max_len": model.max_len,
                                                             "pooling": model.pooling})
    save_model(model.head, str(Path(path) / HEAD_FILE))
    return Path(path)


def load_reward_model(path: str | Path) -> tuple[RewardModel, object]:
    from safetensors.torch import load_model

    from llm_lifecycle.models.checkpoint import load_model_dir, read_config

    config = read_config(path)
    head_file = config.get("reward_head")
    if head_file is None:
        raise ValueError(f"{path}: not a reward model (no reward_head in config.json)")
    backbone, tokenizer = load_model_dir(path)
    model = RewardModel(backbone, config.get("max_len"), config.get("pooling", "last"))
    load_model(model.head, str(Path(path) / head_file))
    return model.eval(), tokenizer
