"""LoRA (Hu et al. 2021): train a low-rank update B·A beside each frozen projection, then
fold it into the weight (W + α/r · B·A) so the saved model is a plain decoder again.

B starts at zero, so the adapted model starts exactly at the base model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The attention and MLP projections (the decoder's nn.Linear layers except the router and head).
TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T.to(x.dtype)) @ (self.lora_b.T.to(x.dtype) * self.scale)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += (self.lora_b @ self.lora_a * self.scale).to(self.base.weight.dtype)
        return self.base.requires_grad_(True)


def apply_lora(model: nn.Module, rank: int, alpha: float) -> list[tuple[str, nn.Parameter]]:
    """Freeze `model` and wrap its TARGETS projections in place; returns the trainable (LoRA) parameters."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in TARGETS and type(child) is nn.Linear:
                setattr(module, name, LoRALinear(child, rank, alpha))
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its projection, in place; every parameter trainable again."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model.requires_grad_(True)
