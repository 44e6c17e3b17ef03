"""How much memory a model needs to train and to serve, from its shape alone.

The registry knows no model internals: callers describe the model as a `ModelShape` of
plain numbers (workflows/planning.py builds one from a ModelConfig or a parameter count).

Training peak = weights + AdamW's two moments (+ an fp32 master copy when the weights are
16-bit) + the activations autograd keeps at the end of the forward pass (the peak: the
gradients are allocated while activations are freed, so they only count when they exceed
the activations) + what the head's loss holds. Activations are counted tensor by tensor
from what our decoder saves for backward (fused q/k/v and gate/up projections, SDPA
attention, experts in one grouped matmul); tests/test_planning.py checks the total against
a measured peak.
Inference = weights at their precision + KV cache (MLA: the latent cache) + the prefill's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

# Bytes per value. int8/int4 weights carry one fp16 scale per output row (negligible here).
PRECISION_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass
class ModelShape:
    params: int
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    n_experts: int = 0
    experts_per_token: int = 0
    moe_ffn_dim: int = 0
    n_shared_experts: int = 0
    n_dense_layers: int = 0  # MoE models: the first layers with a dense MLP
    qk_norm: bool = False
    fused_loss: bool = True  # the chunked linear+cross-entropy head (False: full logits, e.g. max-z loss)
    gated_mlp: bool = True  # SwiGLU/GeGLU (gate and up) or a plain two-layer MLP
    parallel_block: bool = False  # attention and MLP share one norm
    # Multi-head latent attention: the values a layer caches per token (latent + RoPE key),
    # in place of the keys and values of every kv head; 0 for other attention.
    latent_kv_dim: int = 0


def activation_values_per_token(s: ModelShape) -> float:
    """Values autograd keeps per token for backward, summed over layers, excluding logits."""
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    norm = 3 * s.dim  # each norm keeps its input, the normalised value and its output
    # Attention: the fused q/k/v output, rotated q and k, the attention output and its
    # re-laid-out copy (the input of the output projection).
    attention = norm + (q + 2 * kv) + (q + kv) + 2 * q
    if s.qk_norm:
        attention += 2 * (q + kv)  # normalised q, k and the norms' outputs

    def mlp(hidden: int) -> int:  # gated: gate+up output, activation, product; plain: up, activation
        return (4 if s.gated_mlp else 2) * hidden

    dense = mlp(s.ffn_dim)
    moe = 0.0
    if s.n_experts:
        k = s.experts_per_token
        # router logits and probabilities; per routed copy: the gathered input, its expert MLP,
        # the expert output and its weighted value (grouped matmul: no padding). The padded
        # bmm fallback (GPUs before Hopper) keeps up to ~25% more of the expert part.
        moe = 2 * s.n_experts + k * (3 * s.dim + mlp(s.moe_ffn_dim)) + mlp(s.n_shared_experts * s.moe_ffn_dim)
    moe_layers = s.n_layers - s.n_dense_layers if s.n_experts else 0
    ffn_norms = 0 if s.parallel_block else norm
    return (s.n_layers * (attention + ffn_norms) + moe_layers * moe + (s.n_layers - moe_layers) * dense
            + norm)  # + the final norm


def weight_copies(s: ModelShape) -> float:
    """Values of the concatenated q/k/v and dense gate/up weights kept for backward, all
    layers (the grouped experts use their weights in place)."""
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    moe_layers = s.n_layers - s.n_dense_layers if s.n_experts else 0
    gate_up = (s.n_layers - moe_layers) * 2 * s.ffn_dim * s.dim if s.gated_mlp else 0
    return s.n_layers * s.dim * (q + 2 * kv) + gate_up


def loss_chunk_rows(vocab_size: int) -> int:
    """Rows of logits the fused head loss computes at a time (as models/decoder.py does)."""
    return max(128, (1 << 21) // vocab_size)


def head_loss_memory(s: ModelShape, tokens: int, act_bytes: float) -> float:
    """Bytes the loss adds at the forward peak. Fused: the gradients it computes while
    running forward (the hidden states' and the head weight's) and one chunk of fp32 logits
    (plus its 16-bit product in mixed precision). Unfused: all logits and their fp32
    log-probabilities."""
    if not s.fused_loss:
        return tokens * s.vocab_size * (act_bytes + 4)
    chunk = loss_chunk_rows(s.vocab_size) * s.vocab_size * (4 if act_bytes == 4 else 4 + act_bytes)
    return tokens * s.dim * act_bytes + 4.0 * s.vocab_size * s.dim + chunk


def training_memory(s: ModelShape, batch_size: int, seq_len: int, precision: str = "fp32") -> dict[str, float]:
    """Bytes at the training step's peak. `precision`: fp32, or bf16/fp16 mixed precision
    (fp32 master weights and moments, 16-bit activations)."""
    act_bytes = PRECISION_BYTES[precision]
    tokens = batch_size * seq_len
    weights = 4.0 * s.params
    optimizer = 8.0 * s.params
    grads = 4.0 * s.params
    activations = (tokens * activation_values_per_token(s) + weight_copies(s)) * act_bytes
    loss = head_loss_memory(s, tokens, act_bytes)
    return {"weights": weights, "optimizer": optimizer, "grads": grads, "activations": activations,
            "loss": loss, "total": weights + optimizer + max(activations + loss, grads)}


def inference_memory(s: ModelShape, batch_size: int, seq_len: int, precision: str = "fp16",
                     kv_precision: str | None = None) -> dict[str, float]:
    """Bytes to generate up to `seq_len` tokens for `batch_size` sequences: weights at
    `precision` (fp32/bf16/fp16/int8/int4), the KV cache, the prompt's last logits."""
    weight_bytes = PRECISION_BYTES[precision]
    kv_bytes = PRECISION_BYTES[kv_precision or ("fp16" if weight_bytes < 2 else precision)]
    weights = s.params * weight_bytes
    per_token = s.latent_kv_dim or 2 * s.n_kv_heads * s.head_dim
    kv_cache = s.n_layers * per_token * batch_size * seq_len * kv_bytes
    working = batch_size * (s.vocab_size * 4 + 8 * s.dim * kv_bytes)  # one step's logits and hidden states
    return {"weights": weights, "kv_cache": kv_cache, "working": working, "total": weights + kv_cache + working}


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (for plans printed to people)."""
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.1f} {unit}"
