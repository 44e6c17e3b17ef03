"""The decoder's configuration: one dataclass that says every shape and design choice.

Counting (parameters, FLOPs, memory) lives here too, so a recipe can be planned without
building the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Decides the Hugging Face layout used by export/import (the transformers model_type).
FAMILIES = (
    "llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "mixtral", "deepseek_v2", "deepseek_v3", "gemma", "phi", "glm",
    "glm4", "gemma2", "internlm3",
)
# Families whose checkpoints ship as remote code (Qwen 1, Baichuan 2, ChatGLM, InternLM2):
# imported by our own mapping (models/hf_remote.py); exported through the transformers
# layout that computes the same where the model uses nothing else (models/hf.py: EXPORTS_AS),
# to GGUF (models/gguf.py), or in our own format.
FAMILIES += ("qwen", "baichuan", "chatglm", "internlm2", "qwen2_moe", "phi3", "phi3small")
ROPE_SCALING_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "geglu", "gelu", "gegelu")
POSITIONS = ("rope", "alibi")
MOE_BALANCE = ("micro_batch", "global_batch")
ROUTER_SCORES = ("softmax", "sigmoid")
YARN_MSCALES = ("mscale", "mscale_all_dim")  # DeepSeek's YaRN temperatures (rope_scaling keys)
# How a group of experts is ranked for group-limited routing: by the sum of its two best
# scores (DeepSeek-V3, noaux_tc) or by its best one (DeepSeek-V2, group_limited_greedy).
EXPERT_GROUP_SCORES = ("top2_sum", "max")


@dataclass
class ModelConfig:
    family: str = "llama"
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4  # == n_heads: MHA; 1: MQA; in between: GQA
    head_dim: int | None = None  # None: dim // n_heads
    norm: str = "rmsnorm"  # rmsnorm (LLaMA, Qwen) | layernorm (GPT-J, Phi, with bias)
    # swiglu | geglu (gated, GELU-tanh) | gelu (plain two-layer MLP) | gegelu (Phi-3-small: quick
    # GELU of the gate times (up + 1), both clamped at gegelu_limit)
    mlp: str = "swiglu"
    ffn_dim: int | None = 688  # hidden size of the dense MLP; None: sized from dim (see _default_ffn_dim)
    ffn_multiple_of: int = 256  # the None sizing rounds up to a multiple of this (LLaMA's multiple_of)
    norm_eps: float = 1e-5
    position: str = "rope"  # rope | alibi (Baichuan2-13B: a per-head linear distance penalty, no rotation)
    rope_theta: float = 10_000.0
    rotary_pct: float = 1.0  # rotate only the first fraction of each head's dims (Phi 0.4, ChatGLM2 0.5)
    rope_2d: bool = False  # GLM 2D positions: half the rotary dims carry the position, half the span position
    # None or {"type": "linear" | "ntk" | "yarn" | "llama3", "factor": float, "original_max_seq_len": int}
    # (llama3, the Llama 3.1 rule, also takes "low_freq_factor" and "high_freq_factor", default 1 and 4;
    # longrope, Phi-3's LongRoPE, takes per-frequency "short_factor" and "long_factor" lists, used
    # while the sequence is within / past original_max_seq_len, and optionally the cos/sin scale of
    # each, "short_mscale" and "long_mscale" (Phi-3-small-128k); without them both are
    # sqrt(1 + ln(factor) / ln(original_max_seq_len)); yarn with MLA may take DeepSeek's "mscale" and
    # "mscale_all_dim", together: cos/sin scaled by m(mscale) / m(mscale_all_dim) and every query-key
    # score by m(mscale_all_dim)^2, m(x) = 0.1 x ln(factor) + 1, instead of cos/sin by m(1))
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 256
    # Sliding-window attention: each query sees its last `sliding_window` keys (itself included).
    # An int applies to every layer (Mistral), or to the lowest `window_layers` layers only
    # (Qwen: smaller windows in lower layers); a list gives each layer's window (null = full).
    sliding_window: int | list[int | None] | None = None
    window_layers: int | None = None
    # Qwen1 LogN scaling: at positions past this training length, q is scaled by log_len(pos).
    logn_train_len: int | None = None
    # Dual Chunk Attention (An et al. 2024; Qwen2.5-1M), training-free context extension: the
    # sequence in chunks of dca_chunk tokens; keys at their position inside their chunk, and each
    # query at its own (keys of its chunk), at dca_chunk + its own when it is within the first
    # dca_local_window of its chunk (keys of the previous chunk: their true distance), else at
    # the largest position dca_chunk + dca_local_window - 1 (every earlier key). No distance
    # passes dca_chunk + dca_local_window - 1, so that sum at most the trained length keeps every
    # distance trained; up to that length it equals plain attention. None: off.
    dca_chunk: int | None = None
    dca_local_window: int = 0
    # Gemma 2: attention scores scaled by query_pre_attn_scalar^-0.5 instead of head_dim^-0.5
    # (27B: dim / n_heads); soft caps cap * tanh(x / cap) on the attention scores (50) and on
    # the output logits (30), so neither grows without bound. None: off.
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Phi-3-small block-sparse attention, on when blocksparse_block_size is set: positions in
    # blocks of that many tokens; a query's block sees its blocksparse_local_blocks most recent
    # blocks (its own included) and, before them, the vertical stripes: block b where
    # (b + 1 + h * step) % blocksparse_vert_stride == 0 for head h, step = max(1, stride //
    # n_heads), so the heads together cover every block (blocksparse_homo_heads: h = 0 for all).
    # Layers i with (i + 1) % dense_attention_every_n_layers == 0 stay dense (0: none do).
    blocksparse_block_size: int | None = None
    blocksparse_local_blocks: int = 1
    blocksparse_vert_stride: int = 1
    blocksparse_homo_heads: bool = False
    dense_attention_every_n_layers: int = 0
    # mlp gegelu's clamp: the gate at most this, the linear half within +-this (null: no clamp)
    gegelu_limit: float | None = None
    # muP (Phi-3-small): token embeddings times embedding_multiplier (10) and logits divided by
    # logit_divisor (its mup_width_multiplier, 8). Its attention scale mup_attn_multiplier /
    # head_dim is query_pre_attn_scalar = (head_dim / mup_attn_multiplier)^2.
    embedding_multiplier: float = 1.0
    logit_divisor: float = 1.0
    qkv_bias: bool = False
    o_bias: bool = False  # bias on the attention output projection (Phi; Llama/Qwen3 `attention_bias`)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    parallel_block: bool = False  # x + attn(norm(x)) + mlp(norm(x)) with one shared norm (GPT-J, Phi)
    post_norms: bool = False  # "sandwich": x + norm(attn(norm(x))), x + norm(mlp(norm(x))) (GLM-4-0414, Gemma 2)
    mlp_bias: bool = False  # biases on the dense MLP's projections (Phi)
    tie_embeddings: bool = True
    scale_embeddings: bool = False  # token embeddings times sqrt(dim) (Gemma; keeps them on the scale of the stream)
    head_bias: bool = False  # bias on the output head (Phi)
    norm_head: bool = False  # Baichuan2 NormHead: the output head's rows are L2-normalised
    max_z_loss_coef: float = 0.0  # Baichuan2 max-z loss: coef * (max logit)^2, added to aux_loss (2e-4)
    # Mixture of experts (n_experts == 0: every layer is a dense MLP)
    n_experts: int = 0
    n_experts_per_token: int = 2
    moe_ffn_dim: int = 256
    n_shared_experts: int = 0  # DeepSeekMoE: experts every token uses, besides its routed top-k
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared experts' output times sigmoid(w . x), per token
    n_dense_layers: int = 0  # the first layers keep a dense MLP (DeepSeek's first_k_dense_replace)
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss (e.g. 1e-3) keeps router logits small
    # "micro_batch": balance each micro-batch; "global_batch": count expert loads over the
    # whole step (all micro-batches and data-parallel ranks), as Qwen3 does
    moe_balance: str = "micro_batch"
    # DeepSeek-V3 routing: sigmoid affinities; a per-expert bias (router_bias, adjusted for
    # balance instead of an aux loss) that only steers the top-k choice; experts in
    # n_expert_groups groups of which each token may use topk_groups (ranked by
    # expert_group_score); the chosen weights times routed_scale.
    router_score: str = "softmax"  # softmax | sigmoid
    router_bias: bool = False
    # DeepSeek-V3's auxiliary-loss-free balancing speed (gamma, 0.001 in the report): after
    # each optimizer step every expert's bias moves by gamma towards balance, up when the
    # expert got fewer than the mean assignments that step, down when more. 0: bias frozen.
    router_bias_update: float = 0.0
    n_expert_groups: int = 1
    topk_groups: int = 1
    # a group's rank: "top2_sum", its two best scores summed (V3); "max", its best score (V2)
    expert_group_score: str = "top2_sum"
    routed_scale: float = 1.0
    # Multi-head latent attention (DeepSeek-V2/V3), on when kv_lora_rank > 0: keys and values
    # are expanded from one kv_lora_rank latent per token (what the KV cache keeps, with the
    # shared RoPE key; decoding attends over it directly). Each head's query/key is a part without
    # RoPE (qk_nope_head_dim) plus a rotated part (qk_rope_head_dim) whose key is one vector
    # shared by all heads (decoupled RoPE); values have v_head_dim. q_lora_rank > 0 sends
    # queries through a low-rank latent too. head_dim is then qk_nope_head_dim + qk_rope_head_dim.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        # Resolve the default head size; left None when it would not be whole so validate() says so.
        if self.head_dim is None and self.is_mla:
            self.head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.head_dim is None and self.n_heads > 0 and self.dim % self.n_heads == 0:
            self.head_dim = self.dim // self.n_heads
        if self.ffn_dim is None and self.dim > 0 and self.ffn_multiple_of > 0:
            self.ffn_dim = self._default_ffn_dim()

    def _default_ffn_dim(self) -> int:
        """4 * dim for a plain MLP; gated MLPs have three matrices, so 2/3 of that (8/3 * dim)
        keeps the parameters equal (LLaMA), rounded up to a multiple of ffn_multiple_of."""
        hidden = 4 * self.dim if self.mlp == "gelu" else int(2 * 4 * self.dim / 3)
        return self.ffn_multiple_of * -(-hidden // self.ffn_multiple_of)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key, value in d.items():
            if key not in defaults:
                raise ValueError(f"unknown model setting '{key}'; valid settings: {', '.join(defaults)}")
            _require_type(key, value, defaults[key])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def fused_loss_applies(self) -> bool:
        """Whether training's loss can come straight from the head (the chunked linear + cross-
        entropy) without the full logits: not when max-z loss or a logit soft cap needs them."""
        return not self.max_z_loss_coef and not self.final_logit_softcap

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dims RoPE rotates (0 with ALiBi)."""
        if self.position != "rope":
            return 0
        if self.is_mla:
            return self.qk_rope_head_dim
        rotary = int(self.head_dim * self.rotary_pct)
        return rotary - rotary % (4 if self.rope_2d else 2)

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.n_dense_layers

    def is_block_sparse_layer(self, layer: int) -> bool:
        every = self.dense_attention_every_n_layers
        return self.blocksparse_block_size is not None and not (every and (layer + 1) % every == 0)

    def layer_windows(self) -> list[int | None]:
        """Each layer's attention window (None: full causal attention)."""
        if isinstance(self.sliding_window, list):
            return list(self.sliding_window)
        windowed = self.n_layers if self.window_layers is None else self.window_layers
        return [self.sliding_window if i < windowed else None for i in range(self.n_layers)]

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
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("position", POSITIONS), ("moe_balance", MOE_BALANCE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} '{getattr(self, name)}' is not one of {', '.join(allowed)}")
        _require_positive_int("ffn_multiple_of", self.ffn_multiple_of)
        if self.post_norms and self.parallel_block:
            raise ValueError("post_norms normalises each branch of the sequential block; it needs parallel_block: false")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not 0 < self.rotary_pct <= 1:
            raise ValueError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.position == "rope" and self.rotary_dim == 0:
            raise ValueError(f"rotary_pct ({self.rotary_pct}) of head_dim ({self.head_dim}) rotates no dims; raise it")
        if self.rope_2d and self.position != "rope":
            raise ValueError("rope_2d (GLM 2D positions) needs position: rope")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        self._validate_rope_scaling()
        self._validate_windows()
        self._validate_mla()
        if self.logn_train_len is not None:
            _require_positive_int("logn_train_len", self.logn_train_len)
        self._validate_dual_chunk()
        self._validate_block_sparse()
        self._validate_mup()
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise ValueError(f"{name} must be a positive number or null, got {value!r}")
        if self.is_mla and (self.query_pre_attn_scalar or self.attn_logit_softcap):
            raise ValueError("query_pre_attn_scalar and attn_logit_softcap are Gemma 2's; latent attention has neither")
        if self.norm_head and self.tie_embeddings:
            raise ValueError("norm_head normalises the output head's rows; it needs tie_embeddings: false")
        if self.max_z_loss_coef < 0:
            raise ValueError(f"max_z_loss_coef must be >= 0, got {self.max_z_loss_coef}")
        if self.n_experts < 0:
            raise ValueError(f"n_experts must be >= 0 (0 = dense), got {self.n_experts}")
        if self.n_shared_experts < 0 or (self.n_shared_experts and not self.is_moe):
            raise ValueError(f"n_shared_experts ({self.n_shared_experts}) must be >= 0, and needs n_experts > 0")
        if self.shared_expert_gate and not self.n_shared_experts:
            raise ValueError("shared_expert_gate scales the shared experts' output; it needs n_shared_experts > 0")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(f"n_dense_layers ({self.n_dense_layers}) must be between 0 and n_layers ({self.n_layers})")
        if self.is_moe:
            if self.mlp_bias:
                raise ValueError("mlp_bias applies to dense MLPs; MoE experts have no biases")
            if self.mlp in ("gelu", "gegelu"):
                raise ValueError("MoE experts are gated MLPs; use mlp: swiglu or geglu with n_experts > 0")
            if not 1 <= self.n_experts_per_token <= self.n_experts:
                raise ValueError(
                    f"n_experts_per_token ({self.n_experts_per_token}) must be between 1 and n_experts ({self.n_experts})"
                )
            if self.moe_ffn_dim <= 0:
                raise ValueError(f"moe_ffn_dim must be positive, got {self.moe_ffn_dim}")
            if self.router_aux_loss_coef < 0:
                raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
            self._validate_routing()
            if self.router_z_loss_coef < 0:
                raise ValueError(f"router_z_loss_coef must be >= 0, got {self.router_z_loss_coef}")

    def _validate_block_sparse(self) -> None:
        if self.blocksparse_block_size is None:
            knobs = {"blocksparse_local_blocks": 1, "blocksparse_vert_stride": 1, "blocksparse_homo_heads": False,
                     "dense_attention_every_n_layers": 0}
            changed = [name for name, default in knobs.items() if getattr(self, name) != default]
            if changed:
                raise ValueError(f"{', '.join(changed)} shape block-sparse attention; set blocksparse_block_size too")
            return
        for name in ("blocksparse_block_size", "blocksparse_local_blocks", "blocksparse_vert_stride"):
            _require_positive_int(name, getattr(self, name))
        every = self.dense_attention_every_n_layers
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"dense_attention_every_n_layers must be an integer >= 0 (0: no dense layers), got {every!r}")
        others = {"sliding_window": self.sliding_window is not None, "latent attention": self.is_mla,
                  "dca_chunk": self.dca_chunk is not None}
        clash = [name for name, on in others.items() if on]
        if clash:
            raise ValueError(f"blocksparse_block_size (block-sparse attention) cannot be combined with {', '.join(clash)}")

    def _validate_mup(self) -> None:
        for name in ("embedding_multiplier", "logit_divisor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        limit = self.gegelu_limit
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
                raise ValueError(f"gegelu_limit must be a positive number or null, got {limit!r}")
            if self.mlp != "gegelu":
                raise ValueError(f"gegelu_limit clamps the gegelu MLP; it needs mlp: gegelu (got {self.mlp})")

    def _validate_mla(self) -> None:
        if not self.is_mla:
            return
        for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _require_positive_int(name, getattr(self, name))
        if self.q_lora_rank < 0:
            raise ValueError(f"q_lora_rank must be >= 0 (0: no query latent), got {self.q_lora_rank}")
        if self.head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:
            raise ValueError(
                f"with MLA head_dim ({self.head_dim}) must be qk_nope_head_dim + qk_rope_head_dim "
                f"({self.qk_nope_head_dim + self.qk_rope_head_dim}); leave it unset"
            )
        if self.n_kv_heads != self.n_heads or self.position != "rope" or self.qkv_bias or self.o_bias or self.qk_norm:
            raise ValueError("MLA expands keys and values for every head from its latent: it needs n_kv_heads = n_heads, "
                             "position rope, and no qkv_bias, o_bias or qk_norm")

    def _validate_routing(self) -> None:
        if self.router_score not in ROUTER_SCORES:
            raise ValueError(f"router_score '{self.router_score}' is not one of {', '.join(ROUTER_SCORES)}")
        _require_positive_int("n_expert_groups", self.n_expert_groups)
        if self.expert_group_score not in EXPERT_GROUP_SCORES:
            raise ValueError(f"expert_group_score '{self.expert_group_score}' is not one of {', '.join(EXPERT_GROUP_SCORES)}")
        per_group = self.n_experts // self.n_expert_groups
        if self.n_experts % self.n_expert_groups or (self.n_expert_groups > 1 and per_group < 2):
            raise ValueError(
                f"n_experts ({self.n_experts}) must split into n_expert_groups ({self.n_expert_groups}) groups of at least 2"
            )
        if not 1 <= self.topk_groups <= self.n_expert_groups:
            raise ValueError(f"topk_groups ({self.topk_groups}) must be between 1 and n_expert_groups ({self.n_expert_groups})")
        if self.topk_groups * per_group < self.n_experts_per_token:
            raise ValueError(
                f"topk_groups ({self.topk_groups}) groups hold fewer experts than n_experts_per_token ({self.n_experts_per_token})"
            )
        if not self.routed_scale > 0:
            raise ValueError(f"routed_scale must be positive, got {self.routed_scale}")
        if self.router_bias_update < 0 or (self.router_bias_update and not self.router_bias):
            raise ValueError(f"router_bias_update ({self.router_bias_update}) must be >= 0, and needs router_bias: true")

    def _validate_windows(self) -> None:
        window = self.sliding_window
        if isinstance(window, list):
            if len(window) != self.n_layers:
                raise ValueError(f"sliding_window lists {len(window)} windows for {self.n_layers} layers; give one per layer")
            if self.window_layers is not None:
                raise ValueError("window_layers applies to a single sliding_window; with a per-layer list leave it unset")
        elif window is None and self.window_layers is not None:
            raise ValueError("window_layers needs a sliding_window size")
        for w in self.layer_windows():
            if w is not None:
                _require_positive_int("sliding_window", w)
        if self.window_layers is not None and not (isinstance(self.window_layers, int) and 0 <= self.window_layers <= self.n_layers):
            raise ValueError(f"window_layers must be between 0 and n_layers ({self.n_layers}), got {self.window_layers!r}")

    def _validate_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict):
            raise ValueError(f"rope_scaling must be a mapping or null, got {scaling!r}")
        valid = {"type", "factor", "original_max_seq_len"}
        if scaling.get("type") == "llama3":
            valid |= {"low_freq_factor", "high_freq_factor"}
        if scaling.get("type") == "longrope":
            valid |= {"short_factor", "long_factor", "short_mscale", "long_mscale"}
        if scaling.get("type") == "yarn":
            valid |= set(YARN_MSCALES)
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
        if scaling["type"] in ("dynamic", "yarn", "llama3", "longrope"):
            original = scaling.get("original_max_seq_len")
            if not isinstance(original, int) or original <= 0:
                raise ValueError(
                    "rope_scaling.original_max_seq_len (the pretraining context length) is required for "
                    f"{scaling['type']}, got {original!r}"
                )
        mscales = [key for key in YARN_MSCALES if key in scaling]
        if mscales and (len(mscales) < 2 or not self.is_mla):
            raise ValueError("rope_scaling mscale and mscale_all_dim (DeepSeek's YaRN) go together and need MLA "
                             "(kv_lora_rank > 0)")
        for key in mscales:
            if isinstance(scaling[key], bool) or not isinstance(scaling[key], (int, float)) or not scaling[key] > 0:
                raise ValueError(f"rope_scaling.{key} must be a positive number, got {scaling[key]!r}")
        if scaling["type"] == "llama3" and not scaling.get("low_freq_factor", 1.0) < scaling.get("high_freq_factor", 4.0):
            raise ValueError("rope_scaling.low_freq_factor must be below high_freq_factor")
        if scaling["type"] == "longrope":
            pairs = self.rotary_dim // (4 if self.rope_2d else 2)
            for key in ("short_factor", "long_factor"):
                factors = scaling.get(key)
                if not isinstance(factors, list) or len(factors) != pairs or not all(
                        isinstance(f, (int, float)) and f > 0 for f in factors):
                    raise ValueError(f"rope_scaling.{key} must list {pairs} positive numbers, one per rotated "
                                     f"frequency (rotary dims / 2), got {factors!r}")
            for key in ("short_mscale", "long_mscale"):
                value = scaling.get(key, 1.0)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise ValueError(f"rope_scaling.{key} must be a positive number, got {value!r}")

    def _validate_dual_chunk(self) -> None:
        if self.dca_chunk is None:
            if self.dca_local_window:
                raise ValueError("dca_local_window needs dca_chunk (Dual Chunk Attention's chunk length)")
            return
        _require_positive_int("dca_chunk", self.dca_chunk)
        window = self.dca_local_window
        if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= self.dca_chunk:
            raise ValueError(f"dca_local_window must be an integer between 0 and dca_chunk ({self.dca_chunk}), got {window!r}")
        others = {"position: alibi": self.position != "rope", "latent attention": self.is_mla,
                  "sliding_window": self.sliding_window is not None, "logn_train_len": self.logn_train_len is not None,
                  "rope_2d": self.rope_2d, "attn_logit_softcap": self.attn_logit_softcap is not None}
        clash = [name for name, on in others.items() if on]
        if clash:
            raise ValueError(f"dca_chunk (Dual Chunk Attention) re-positions RoPE queries and keys; it cannot be combined "
                             f"with {', '.join(clash)}")

    # ---- counting -------------------------------------------------------------------------

    def _attention_params(self) -> int:
        if self.is_mla:
            return self._mla_params()
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        params = self.dim * (q_out + 2 * kv_out) + q_out * self.dim
        if self.qkv_bias:
            params += q_out + 2 * kv_out
        if self.o_bias:
            params += self.dim
        if self.qk_norm:
            params += 2 * self.head_dim
        return params

    def _mla_params(self) -> int:
        q_out = self.n_heads * self.head_dim
        q = self.dim * q_out if not self.q_lora_rank else self.q_lora_rank * (self.dim + 1 + q_out)
        kv_a = self.dim * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv_b = self.kv_lora_rank * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv_a + kv_b + self.n_heads * self.v_head_dim * self.dim

    def _norm_params(self) -> int:
        return 2 * self.dim if self.norm == "layernorm" else self.dim  # LayerNorm has a bias

    def _mlp_params(self, hidden: int) -> int:
        params = (2 if self.mlp == "gelu" else 3) * self.dim * hidden
        if self.mlp_bias:
            params += (1 if self.mlp == "gelu" else 2) * hidden + self.dim
        return params

    def _layer_params(self, layer: int, experts_counted: int) -> int:
        """One block; `experts_counted` routed experts of an MoE layer (all for total, top-k for active)."""
        norms = ((1 if self.parallel_block else 2) + (2 if self.post_norms else 0)) * self._norm_params()
        if self.is_moe_layer(layer):
            router = self.dim * self.n_experts
            mlp = router + self._mlp_params(self.moe_ffn_dim) * (experts_counted + self.n_shared_experts)
            mlp += self.dim if self.shared_expert_gate else 0
        else:
            mlp = self._mlp_params(self.ffn_dim)
        return norms + self._attention_params() + mlp

    def _head_params(self) -> int:
        return (0 if self.tie_embeddings else self.vocab_size * self.dim) + (self.vocab_size if self.head_bias else 0)

    def _count(self, experts_counted: int) -> int:
        layers = sum(self._layer_params(i, experts_counted) for i in range(self.n_layers))
        return self.vocab_size * self.dim + layers + self._norm_params() + self._head_params()

    def num_params(self) -> int:
        """Every parameter (tied embedding/head counted once) == sum(p.numel()) of the Decoder."""
        return self._count(self.n_experts)

    def active_params(self) -> int:
        """Parameters one token uses: MoE layers count only their top-k (and shared) experts."""
        return self._count(self.n_experts_per_token)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6 N + 12 L H Q T.

        N is the active parameters that take part in matmuls: the input embedding is a lookup,
        so it is left out, but the output head (tied or not) is a vocab x dim matmul and is in.
        T is what a query attends to: the sequence, or the layer's window when that is shorter.
        """
        matmul_params = self.active_params() - self.vocab_size * self.dim
        if self.tie_embeddings:
            matmul_params += self.vocab_size * self.dim
        windows = self.layer_windows()
        context = sum(self._block_sparse_keys(seq_len) if self.is_block_sparse_layer(i) else min(seq_len, w or seq_len)
                      for i, w in enumerate(windows))
        attention = 12 * self.n_heads * self.head_dim * context
        return float(6 * matmul_params + attention)

    def _block_sparse_keys(self, seq_len: int) -> float:
        """Keys a query of a block-sparse layer attends to, averaged over the sequence's queries
        and the heads: causal keys of its local blocks plus the whole stripe blocks before them."""
        size, local, stride = self.blocksparse_block_size, self.blocksparse_local_blocks, self.blocksparse_vert_stride
        step = max(1, stride // self.n_heads)
        offsets = [0] if self.blocksparse_homo_heads else [h * step for h in range(self.n_heads)]
        total = 0
        for block in range(-(-seq_len // size)):
            first = max(0, block - local + 1) * size  # where the local blocks start
            positions = range(block * size, min(seq_len, (block + 1) * size))
            local_keys = sum(p - first + 1 for p in positions)
            # blocks b < first // size with (b + 1 + offset) % stride == 0, per head
            stripes = sum((first // size + o) // stride - o // stride for o in offsets)
            total += local_keys * len(offsets) + stripes * size * len(positions)
        return total / (seq_len * len(offsets))


def _require_type(name: str, value: Any, default: Any) -> None:
    """A setting takes its default's type (an int where a float is expected); settings
    whose default is None are checked by validate()."""
    if default is None or default is dataclasses.MISSING:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float) if isinstance(default, float) else int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"{name} must be {'a number' if isinstance(default, float) else type(default).__name__}, "
                         f"got {value!r}")


def _require_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
