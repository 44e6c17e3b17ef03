"""The decoder's configuration: one dataclass that says every shape and design choice.

Counting (parameters, FLOPs, memory) lives here too, so a recipe can be planned without
building the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

FAMILIES = ("llama", "qwen3_moe")  # decides the Hugging Face layout used by export/import
ROPE_SCALING_TYPES = ("linear", "ntk", "yarn", "llama3")
MOE_BALANCE = ("micro_batch", "global_batch")


@dataclass
class ModelConfig:
    family: str = "llama"
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4  # == n_heads: MHA; 1: MQA; in between: GQA
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int = 688  # SwiGLU hidden size of the dense MLP
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    # None or {"type": "linear" | "ntk" | "yarn" | "llama3", "factor": float, "original_max_seq_len": int}
    # (llama3, the Llama 3.1 rule, also takes "low_freq_factor" and "high_freq_factor", default 1 and 4)
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 256
    qkv_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    tie_embeddings: bool = True
    # Mixture of experts (n_experts == 0: every layer is a dense SwiGLU MLP)
    n_experts: int = 0
    n_experts_per_token: int = 2
    moe_ffn_dim: int = 256
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss (e.g. 1e-3) keeps router logits small
    # "micro_batch": balance each micro-batch; "global_batch": count expert loads over the
    # whole step (all micro-batches and data-parallel ranks), as Qwen3 does
    moe_balance: str = "micro_batch"

    def __post_init__(self) -> None:
        # Resolve the default head size; left None when it would not be whole so validate() says so.
        if self.head_dim is None and self.n_heads > 0 and self.dim % self.n_heads == 0:
            self.head_dim = self.dim // self.n_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in valid:
                raise ValueError(f"unknown model setting '{key}'; valid settings: {', '.join(valid)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def validate(self) -> None:
        """Raise ValueError naming the first impossible setting."""
        if self.family not in FAMILIES:
            raise ValueError(f"family '{self.family}' is not one of {', '.join(FAMILIES)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            _require_positive_int(name, getattr(self, name))
        if self.head_dim is None:
            raise ValueError(
                f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads}); change one or set head_dim explicitly"
            )
        _require_positive_int("head_dim", self.head_dim)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads}) "
                "so each key/value head serves a whole group of query heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        self._validate_rope_scaling()
        if self.n_experts < 0:
            raise ValueError(f"n_experts must be >= 0 (0 = dense), got {self.n_experts}")
        if self.is_moe:
            if not 1 <= self.n_experts_per_token <= self.n_experts:
                raise ValueError(
                    f"n_experts_per_token ({self.n_experts_per_token}) must be between 1 and n_experts ({self.n_experts})"
                )
            if self.moe_ffn_dim <= 0:
                raise ValueError(f"moe_ffn_dim must be positive, got {self.moe_ffn_dim}")
            if self.router_aux_loss_coef < 0:
                raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
            if self.router_z_loss_coef < 0:
                raise ValueError(f"router_z_loss_coef must be >= 0, got {self.router_z_loss_coef}")
            if self.moe_balance not in MOE_BALANCE:
                raise ValueError(f"moe_balance must be one of {', '.join(MOE_BALANCE)}, got {self.moe_balance!r}")

    def _validate_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict):
            raise ValueError(f"rope_scaling must be a mapping or null, got {scaling!r}")
        valid = {"type", "factor", "original_max_seq_len"}
        if scaling.get("type") == "llama3":
            valid |= {"low_freq_factor", "high_freq_factor"}
        unknown = set(scaling) - valid
        if unknown:
            raise ValueError(
                f"rope_scaling: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid))}"
            )
        if scaling.get("type") not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling.type must be one of {', '.join(ROPE_SCALING_TYPES)}, got {scaling.get('type')!r}")
        factor = scaling.get("factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f"rope_scaling.factor must be a number >= 1, got {factor!r}")
        if scaling["type"] in ("yarn", "llama3"):
            original = scaling.get("original_max_seq_len")
            if not isinstance(original, int) or original <= 0:
                raise ValueError(
                    "rope_scaling.original_max_seq_len (the pretraining context length) is required for "
                    f"{scaling['type']}, got {original!r}"
                )
        if scaling["type"] == "llama3" and not scaling.get("low_freq_factor", 1.0) < scaling.get("high_freq_factor", 4.0):
            raise ValueError("rope_scaling.low_freq_factor must be below high_freq_factor")

    # ---- counting -------------------------------------------------------------------------

    def _attention_params(self) -> int:
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        params = self.dim * (q_out + 2 * kv_out) + q_out * self.dim
        if self.qkv_bias:
            params += q_out + 2 * kv_out
        if self.qk_norm:
            params += 2 * self.head_dim
        return params

    def _layer_params(self, experts_counted: int) -> int:
        """One block; `experts_counted` experts of the MoE layer (all for total, top-k for active)."""
        norms = 2 * self.dim
        if self.is_moe:
            mlp = self.dim * self.n_experts + experts_counted * 3 * self.dim * self.moe_ffn_dim
        else:
            mlp = 3 * self.dim * self.ffn_dim
        return norms + self._attention_params() + mlp

    def _head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab_size * self.dim

    def num_params(self) -> int:
        """Every parameter (tied embedding/head counted once) == sum(p.numel()) of the Decoder."""
        embedding = self.vocab_size * self.dim
        return embedding + self.n_layers * self._layer_params(self.n_experts) + self.dim + self._head_params()

    def active_params(self) -> int:
        """Parameters one token uses: MoE layers count only their top-k experts."""
        embedding = self.vocab_size * self.dim
        return embedding + self.n_layers * self._layer_params(self.n_experts_per_token) + self.dim + self._head_params()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6 N + 12 L H Q T.

        N is the active parameters that take part in matmuls: the input embedding is a lookup,
        so it is left out, but the output head (tied or not) is a vocab x dim matmul and is in.
        """
        matmul_params = self.active_params() - self.vocab_size * self.dim
        if self.tie_embeddings:
            matmul_params += self.vocab_size * self.dim
        attention = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return float(6 * matmul_params + attention)


def _require_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
