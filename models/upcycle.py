"""Dense -> MoE upcycling (Qwen2, Komatsuzaki et al.'s sparse upcycling): start a mixture-of-
experts model from a trained dense one.

Everything but the MLPs is copied. Each expert is initialised from the dense MLP: the dense
hidden neurons are shuffled (a different permutation per copy) and cut into expert-sized
pieces, as many copies as the experts need — with moe_ffn_dim == ffn_dim every expert is a
whole (permuted) copy, and fine-grained experts get slices. Shared experts are cut from the
same pool; layers the MoE config keeps dense (n_dense_layers) keep the dense MLP. The router
starts near-uniform (tiny weights), so the upcycled model first behaves like a blend of its
initialisations. When every expert is a whole copy, there are no shared experts, no noise,
and the top-k weights are renormalised (and not rescaled), it computes exactly what the dense
model does (`computes_the_dense_model`).
"""

from __future__ import annotations

from typing import Any

import torch

from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import MLP, Decoder, MoE

# The fields that say how a model's MoE layers are built and routed: what a target MoE preset
# lends to a dense model being upcycled.
MOE_FIELDS = (
    "n_experts", "n_experts_per_token", "moe_ffn_dim", "n_shared_experts", "shared_expert_gate", "n_dense_layers",
    "norm_topk_prob", "router_aux_loss_coef", "router_z_loss_coef", "moe_balance", "router_score", "router_bias",
    "router_bias_update", "n_expert_groups", "topk_groups", "expert_group_score", "routed_scale",
)
# The Hugging Face layout of each dense family's MoE sibling (what the upcycled model exports as).
MOE_FAMILY = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}


def upcycled_config(dense: ModelConfig, moe: dict[str, Any], family: str | None = None) -> ModelConfig:
    """`dense` with the MoE fields `moe` (moe_ffn_dim defaults to the dense width: whole-copy
    experts) and the family of its MoE sibling unless `family` is given. ValueError, saying
    what, for a model that is not dense or a layout its MLP cannot fill."""
    if dense.is_moe:
        raise ValueError("upcycle needs a dense model (n_experts == 0)")
    unknown = sorted(set(moe) - set(MOE_FIELDS))
    if unknown:
        raise ValueError(f"not MoE settings: {', '.join(unknown)}; valid: {', '.join(MOE_FIELDS)}")
    if moe.get("n_experts", 0) < 1:
        raise ValueError("upcycling needs n_experts >= 1")
    fields = {**dense.to_dict(), "moe_ffn_dim": dense.ffn_dim, **moe,
              "family": family or MOE_FAMILY.get(dense.family, dense.family)}
    cfg = ModelConfig.from_dict(fields)
    cfg.validate()
    if cfg.moe_ffn_dim > dense.ffn_dim:
        raise ValueError(f"moe_ffn_dim ({cfg.moe_ffn_dim}) cannot exceed the dense ffn_dim ({dense.ffn_dim}) it is cut from")
    return cfg


def computes_the_dense_model(cfg: ModelConfig, noise: float) -> bool:
    """Whether the upcycled model's output equals the dense model's (up to float rounding):
    every routed expert a whole copy, weights summing to 1, nothing added beside them."""
    return (cfg.moe_ffn_dim == cfg.ffn_dim and not cfg.n_shared_experts and cfg.norm_topk_prob
            and cfg.routed_scale == 1.0 and noise == 0)


def upcycle(dense: Decoder, moe_cfg: ModelConfig, noise: float = 0.0, router_std: float = 1e-3,
            seed: int = 0) -> Decoder:
    """A new MoE Decoder of config `moe_cfg` (from `upcycled_config`) whose every MoE layer's
    experts come from `dense`'s MLP of that layer; `noise`: each routed expert's weights get
    Gaussian noise of this many times their standard deviation, so copies can diverge sooner."""
    moe = Decoder(moe_cfg)
    state = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    moe.load_state_dict(state, strict=False)  # the MLP weights are filled in below
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for dense_block, moe_block in zip(dense.layers, moe.layers):
            if isinstance(moe_block.ffn, MoE):
                _init_experts(dense_block.ffn, moe_block.ffn, generator, router_std, noise)
            else:  # a layer the MoE config keeps dense (DeepSeek's first layers)
                moe_block.ffn.load_state_dict(dense_block.ffn.state_dict())
    return moe


def _init_experts(dense: MLP, moe: MoE, generator: torch.Generator, router_std: float, noise: float) -> None:
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
    if noise:
        for w in (moe.w_gate, moe.w_up, moe.w_down):
            w.add_(noise * w.std(dim=(1, 2), keepdim=True) * torch.randn(w.shape, generator=generator))
    if moe.shared is not None:
        first, count = moe.n_experts * width, moe.shared.w_up.out_features
        moe.shared.w_gate.weight.copy_(gate[first : first + count])
        moe.shared.w_up.weight.copy_(up[first : first + count])
        moe.shared.w_down.weight.copy_(down[:, first : first + count])
    torch.nn.init.normal_(moe.router.weight, std=router_std, generator=generator)
