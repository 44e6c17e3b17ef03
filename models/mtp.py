"""DeepSeek-V3's multi-token prediction (MTP) as a pretraining objective.

Besides the next token, D sequential modules predict the tokens after it. Module k takes,
for position i, the previous depth's state h_i^(k-1) (the main model's final states for
k = 1) and the embedding of token i+k, each RMS-normalised, concatenated and projected
back to the model width; one transformer block and its own output norm follow, and the
main model's output head gives the prediction of token i+k+1. The embedding and the head
are shared with the main model. The loss adds weight / D times the sum of the D modules'
cross-entropies (the report: weight 0.3, then 0.1 late in training).

The modules only train: the model saved after pretraining is the main model alone (V3 can
keep them for speculative decoding; we do not). Each module's block is a dense layer (V3's
is an MoE layer), so it adds no router for the balancing to look after.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from llm_lifecycle.models.decoder import Block, Decoder, DecoderOutput, RMSNorm, linear_cross_entropy


class MTPModule(nn.Module):
    def __init__(self, cfg, depth: int):
        super().__init__()
        dense = dataclasses.replace(cfg, n_dense_layers=cfg.n_layers + depth + 1)  # a dense MLP in this block
        self.hidden_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.embed_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(dense, cfg.n_layers + depth)
        self.out_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor, rope, mask) -> torch.Tensor:
        x = self.proj(torch.cat((self.hidden_norm(hidden), self.embed_norm(embedded)), dim=-1))
        x, _ = self.block(x, rope, mask, None)
        return x


class MultiTokenPrediction(nn.Module):
    """A Decoder plus `depth` MTP modules. Forward returns the decoder's output with the
    weighted MTP loss added to `aux_loss` (so `loss` stays the next-token loss) and keeps
    each module's cross-entropy in `mtp_losses` for logging."""

    def __init__(self, decoder: Decoder, depth: int, weight: float):
        super().__init__()
        self.decoder, self.weight = decoder, weight
        self.mtp = nn.ModuleList(MTPModule(decoder.cfg, k) for k in range(depth))
        self.mtp_losses: list[float] = []
        self._init_modules()

    @torch.no_grad()
    def _init_modules(self) -> None:
        for name, param in self.mtp.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.normal_(param, mean=0.0, std=0.02)

    # the trainer's switches and per-step hooks reach the main model
    @property
    def activation_checkpointing(self) -> bool:
        return self.decoder.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self.decoder.activation_checkpointing = on

    def begin_global_batch(self) -> None:
        self.decoder.begin_global_batch()

    def end_step(self) -> None:
        self.decoder.end_step()

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> DecoderOutput:
        out = self.decoder(input_ids, targets=targets)
        decoder, seq = self.decoder, input_ids.size(1)
        hidden, losses = out.hidden, []
        for k, module in enumerate(self.mtp, start=1):
            n = seq - k  # positions that still have a token k+1 ahead of them
            if n <= 0:
                break
            # token i+k (targets[i] is token i+1); an ignored target (-100) embeds as token 0, its loss unused
            embedded = decoder.tok_embeddings(targets[:, k - 1 : k - 1 + n].clamp(min=0))
            embedded = decoder.scale_embeddings(embedded)
            rope = decoder.rope(0, n, input_ids.device) if decoder.rope is not None else []
            mask = decoder._masks(0, n, None, None, input_ids.device, keys=[None])[None]
            hidden = module(hidden[:, :n], embedded, rope, mask)
            losses.append(linear_cross_entropy(decoder.head_input(module.out_norm(hidden)), decoder._head_weight(),
                                               decoder._head_bias(), targets[:, k : k + n]))
        self.mtp_losses = [loss.item() for loss in losses]
        if losses:
            out.aux_loss = out.aux_loss + self.weight * torch.stack(losses).mean()
        return out

    def flops_per_token(self, seq_len: int) -> float:
        """The main model's training FLOPs per token plus each module's: its projection,
        block and the shared head as matmuls (6 per parameter), and its attention."""
        cfg = self.decoder.cfg
        per_module = [6 * (sum(p.numel() for p in m.parameters()) + cfg.vocab_size * cfg.dim)
                      + 12 * cfg.n_heads * cfg.head_dim * seq_len for m in self.mtp]
        return cfg.flops_per_token(seq_len) + sum(per_module)
