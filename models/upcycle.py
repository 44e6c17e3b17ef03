"""Dense -> MoE upcycling (Qwen2): start a mixture-of-experts model from a trained dense one.

Everything but the MLPs is copied. Each expert is initialised from the dense MLP: the dense
hidden neurons are shuffled (a different permutation per copy) and cut into expert-sized
pieces, as many copies as the experts need — with moe_ffn_dim == ffn_dim every expert is a
whole (permuted) copy, and fine-grained experts get slices. Shared experts are cut from the
same pool. The router starts near-uniform (tiny weights), so the upcycled model first
behaves like a blend of its initialisations; when every expert is a whole copy, there are no
shared experts and the top-k probabilities are renormalised, it computes exactly what the
dense model does.
"""

from __future__ import annotations

import dataclasses

import torch

from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import MLP, Decoder, MoE


def upcycle(dense: Decoder, n_experts: int, n_experts_per_token: int, moe_ffn_dim: int | None = None,
            n_shared_experts: int = 0, router_std: float = 1e-3, seed: int = 0) -> Decoder:
    """A new MoE Decoder whose every layer's experts come from `dense`'s MLP of that layer."""
    cfg = dense.cfg
    if cfg.is_moe:
        raise ValueError("upcycle needs a dense model (n_experts == 0)")
    moe_ffn_dim = moe_ffn_dim or cfg.ffn_dim
    if moe_ffn_dim > cfg.ffn_dim:
        raise ValueError(f"moe_ffn_dim ({moe_ffn_dim}) cannot exceed the dense ffn_dim ({cfg.ffn_dim}) it is cut from")
    moe_cfg = dataclasses.replace(cfg, n_experts=n_experts, n_experts_per_token=n_experts_per_token,
                                  moe_ffn_dim=moe_ffn_dim, n_shared_experts=n_shared_experts)
    moe = Decoder(ModelConfig.from_dict(moe_cfg.to_dict()))
    state = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    moe.load_state_dict(state, strict=False)  # the MLP weights are filled in below
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for dense_block, moe_block in zip(dense.layers, moe.layers):
            _init_experts(dense_block.ffn, moe_block.ffn, generator, router_std)
    return moe


def _init_experts(dense: MLP, moe: MoE, generator: torch.Generator, router_std: float) -> None:
    hidden, width = dense.w_up.out_features, moe.w_up.size(1)
    pieces_needed = moe.n_experts + (moe.shared.w_up.out_features // width if moe.shared is not None else 0)
    copies = -(-pieces_needed * width // hidden)
    # Hidden neuron order of each copy: a permutation of the dense MLP's neurons.
    order = torch.cat([torch.randperm(hidden, generator=generator) for _ in range(copies)])
    gate, up, down = dense.w_gate.weight[order], dense.w_up.weight[order], dense.w_down.weight[:, order]
    piece = lambda w, i: w[i * width : (i + 1) * width]  # noqa: E731
    for e in range(moe.n_experts):
        moe.w_gate[e].copy_(piece(gate, e))
        moe.w_up[e].copy_(piece(up, e))
        moe.w_down[e].copy_(piece(down.T, e).T)
    if moe.shared is not None:
        first, count = moe.n_experts * width, moe.shared.w_up.out_features
        moe.shared.w_gate.weight.copy_(gate[first : first + count])
        moe.shared.w_up.weight.copy_(up[first : first + count])
        moe.shared.w_down.weight.copy_(down[:, first : first + count])
    torch.nn.init.normal_(moe.router.weight, std=router_std, generator=generator)
