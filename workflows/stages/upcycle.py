"""Upcycle: turn a trained dense model into a mixture of experts whose experts start from its
MLPs (Qwen2-MoE was upcycled from Qwen2; sparse upcycling, Komatsuzaki et al. 2023), for a
later pretraining phase to continue (`from: [upcycle]`). The MoE layout comes from a target
MoE preset (its experts, top-k, expert width, shared experts and routing) and/or the settings
below; models/upcycle.py says how the experts are cut from the dense MLP.

Logged: held-out perplexity of the dense model and of the upcycled one, and their largest
logit difference (0 up to rounding when every expert is a whole copy: `exact` is then 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_lifecycle.workflows.engine.model_stage import heldout_perplexity, load_input_model, save_stage_model
from llm_lifecycle.workflows.runner.settings import AT_LEAST_1, NON_NEGATIVE, ConfigError, Settings, setting
from llm_lifecycle.workflows.runner.stage import Port, StageContext, StageKind, StageResult

EVAL_WINDOWS = 16


@dataclass
class UpcycleSettings(Settings):
    preset: str | None = setting(None, "take the MoE layout (experts, top-k, expert width, shared experts, routing) "
                                       "from this MoE preset, e.g. qwen2-moe-small; the settings below override it")
    n_experts: int | None = setting(None, "routed experts per layer (default: the preset's, else 8)", limit=AT_LEAST_1)
    n_experts_per_token: int | None = setting(None, "experts each token uses (default: the preset's, else 2)",
                                              limit=AT_LEAST_1)
    moe_ffn_dim: int | None = setting(None, "each expert's width (default: the preset's, else the dense ffn_dim: "
                                            "every expert a whole copy of the dense MLP)", limit=AT_LEAST_1)
    n_shared_experts: int | None = setting(None, "experts every token uses besides its top-k, cut from the dense MLP "
                                                 "(default: the preset's, else 0)", limit=NON_NEGATIVE)
    noise: float = setting(0.0, "Gaussian noise on each routed expert, times its weights' std (0: exact copies)",
                           limit=NON_NEGATIVE)
    seed: int | None = setting(None, "seed of the neuron shuffles, the router init and the noise (default: the "
                                     "recipe's seed)")

    def moe_fields(self) -> tuple[dict[str, Any], str | None]:
        """(the MoE config fields to set, the family to export as or None for the dense family's MoE sibling)."""
        from llm_lifecycle.models.presets import load_preset
        from llm_lifecycle.models.upcycle import MOE_FIELDS

        fields, family = {"n_experts": 8, "n_experts_per_token": 2}, None
        if self.preset is not None:
            preset = load_preset(self.preset)
            if not preset.get("n_experts"):
                raise ValueError(f"preset {self.preset} is dense; name an MoE preset (one with n_experts)")
            fields = {k: v for k, v in preset.items() if k in MOE_FIELDS}
            family = preset.get("family")
        given = {"n_experts": self.n_experts, "n_experts_per_token": self.n_experts_per_token,
                 "moe_ffn_dim": self.moe_ffn_dim, "n_shared_experts": self.n_shared_experts}
        return {**fields, **{k: v for k, v in given.items() if v is not None}}, family

    def target(self, upstream: dict[str, Any]):
        """The upcycled model's ModelConfig."""
        from llm_lifecycle.models.config import ModelConfig
        from llm_lifecycle.models.upcycle import upcycled_config

        moe, family = self.moe_fields()
        return upcycled_config(ModelConfig.from_dict(upstream["model"]), moe, family)

    def check(self, where: str, upstream: dict[str, Any]) -> None:
        try:
            self.target(upstream)
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"{where}: {err}") from None

    def passes_on(self, upstream: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.target(upstream).to_dict()}


def run(ctx: StageContext, cfg: UpcycleSettings) -> StageResult:
    import torch

    from llm_lifecycle.models.upcycle import computes_the_dense_model, upcycle
    from llm_lifecycle.workflows.data.shards import TokenShards

    dense, tokenizer, _ = load_input_model(ctx)
    moe_cfg = cfg.target({"model": dense.cfg.to_dict()})
    moe = upcycle(dense, moe_cfg, noise=cfg.noise, seed=ctx.seed if cfg.seed is None else cfg.seed)
    seq_len = ctx.values["seq_len"]
    window = torch.as_tensor(TokenShards(ctx.input_path("shards", "heldout")).tokens[:seq_len].astype("int64"))[None]
    with torch.no_grad():
        gap = (moe.eval()(window).logits - dense.eval()(window).logits).abs().max().item()
    metrics = {
        "params_dense": float(dense.cfg.num_params()), "params": float(moe_cfg.num_params()),
        "active_params": float(moe_cfg.active_params()), "max_logit_diff": gap,
        "exact": float(computes_the_dense_model(moe_cfg, cfg.noise)),
        "heldout_ppl_dense": heldout_perplexity(ctx, dense, seq_len, EVAL_WINDOWS),
        "heldout_ppl": heldout_perplexity(ctx, moe, seq_len, EVAL_WINDOWS),
    }
    model_dir = save_stage_model(ctx, moe, tokenizer)
    return StageResult(outputs={"model": str(model_dir)}, metrics=metrics, model_dir=str(model_dir))


KIND = StageKind("upcycle", UpcycleSettings, run, inputs=(Port("model", "model"), Port("shards", "shards")),
                 output="model")
