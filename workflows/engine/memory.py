"""How much memory a model needs to train and to serve, from its shape alone.

The registry knows no model internals: callers describe the model as a `ModelShape` of
plain numbers (workflows/runner/planning.py builds one from a ModelConfig or a parameter count).

Training peak = weights + AdamW's two moments (+ an fp32 master copy when the weights are
16-bit) + the activations autograd keeps at the end of the forward pass (the peak: the
gradients are allocated while activations are freed, so they only count when they exceed
the activations) + what the head's loss holds. Activations are counted tensor by tensor
from what our decoder saves for backward (fused q/k/v and gate/up projections, SDPA
attention, experts in one grouped matmul); tests/test_planning.py checks the total against
a measured peak.
Inference = weights at their precision + KV cache (MLA: the latent cache) + the prefill's logits.
LoRA / QLoRA = the frozen base at 16 bits / NF4, fp32 adapters with their AdamW moments and
gradients, and the same activations (backward still runs through every frozen layer).
`gpus_needed` shards a job over GPUs as FSDP / tensor parallelism would, `training_days`
turns FLOPs into time at a given MFU.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

# Bytes per value. int8/int4 weights carry one fp16 scale per output row (negligible here).
PRECISION_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
# QLoRA's base weights: 4-bit NormalFloat plus its double-quantized block constants, 4.127
# bits per parameter (Dettmers et al. 2023, section 3).
NF4_BYTES = 4.127 / 8
# Per GPU, what the job cannot use: the CUDA context and the allocator's fragmentation.
GPU_RESERVED_BYTES = 2 * 2**30


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
    tie_embeddings: bool = False  # one vocab x dim matrix for the embedding and the head
    # Multi-head latent attention: the values a layer caches per token (latent + RoPE key),
    # in place of the keys and values of every kv head; 0 for other attention.
    latent_kv_dim: int = 0
    # Each layer's sliding window (None: full attention); generation keeps a rolling buffer of
    # that many tokens for a windowed layer. Empty: every layer attends to the whole sequence.
    layer_windows: tuple[int | None, ...] = ()
    gegelu: bool = False  # Phi-3-small's clamped GeGeLU: more values kept per hidden unit than a plain gated MLP
    # Phi-3-small's block-sparse layers run as attention with a per-head Bool mask (shared by
    # them, `block_sparse_mask_heads` heads); a masked attention keeps its scores for backward.
    block_sparse_layers: int = 0
    block_sparse_mask_heads: int = 0
    # Dual Chunk Attention computes its scores itself (models/decoder.py dual_chunk_attention),
    # DCA_QUERY_BLOCK query rows at a time, where other attention runs a fused kernel that never
    # holds a T x T matrix.
    materialised_scores: bool = False


DCA_QUERY_BLOCK = 1024  # dual_chunk_attention's `block`


def activation_values_per_token(s: ModelShape, recompute: bool = False) -> float:
    """Values autograd keeps per token for backward, summed over layers, excluding logits.
    With activation checkpointing (`recompute`) a layer keeps only its input until backward
    recomputes it, so the peak holds every layer's input plus the largest layer's own values."""
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    norm = 3 * s.dim  # each norm keeps its input, the normalised value and its output
    # Attention: the fused q/k/v output, rotated q and k, the attention output and its
    # re-laid-out copy (the input of the output projection).
    attention = norm + (q + 2 * kv) + (q + kv) + 2 * q
    if s.qk_norm:
        attention += 2 * (q + kv)  # normalised q, k and the norms' outputs

    def mlp(hidden: int) -> int:  # gated: gate+up output, activation, product; plain: up, activation
        # GeGeLU: gate+up output, the clamped gate, its sigmoid, their product, linear + 1, product
        return (7 if s.gegelu else 4 if s.gated_mlp else 2) * hidden

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
    if recompute:
        largest = attention + ffn_norms + (moe if moe_layers else dense)
        return s.n_layers * s.dim + largest + norm
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


def training_memory(s: ModelShape, batch_size: int, seq_len: int, precision: str = "fp32",
                    recompute: bool = False) -> dict[str, float]:
    """Bytes at the training step's peak. `precision`: fp32, or bf16/fp16 mixed precision
    (fp32 master weights and moments, 16-bit activations); `recompute`: activation checkpointing."""
    act_bytes = PRECISION_BYTES[precision]
    tokens = batch_size * seq_len
    weights = 4.0 * s.params
    optimizer = 8.0 * s.params
    grads = 4.0 * s.params
    copies = weight_copies(s) / (s.n_layers if recompute else 1)  # recompute: one layer's at a time
    activations = (tokens * activation_values_per_token(s, recompute) + copies) * act_bytes
    activations += block_sparse_memory(s, batch_size, seq_len, recompute)
    loss = head_loss_memory(s, tokens, act_bytes)
    if s.materialised_scores:
        activations += score_memory(s, batch_size, seq_len, act_bytes, recompute)
    return {"weights": weights, "optimizer": optimizer, "grads": grads, "activations": activations,
            "loss": loss, "total": weights + optimizer + max(activations + loss, grads)}


def score_memory(s: ModelShape, batch_size: int, seq_len: int, act_bytes: float, recompute: bool) -> float:
    """Training bytes of materialised attention scores: each layer (one at a time under
    `recompute`) keeps its fp32 softmax probabilities for backward (and their 16-bit copy in
    mixed precision), and one layer's
    backward holds about three more score matrices of a query block at a time (measured on
    llama-small with dca_chunk 64: 200.5 / 480.4 MiB peaks at 256 / 512 tokens, planned 213.6 /
    474.6)."""
    keys = batch_size * s.n_heads * seq_len * seq_len
    kept = (1 if recompute else s.n_layers) * keys * (4 + (act_bytes if act_bytes < 4 else 0))
    return kept + 3 * 4.0 * batch_size * s.n_heads * min(seq_len, DCA_QUERY_BLOCK) * seq_len


def block_sparse_memory(s: ModelShape, batch_size: int, seq_len: int, recompute: bool) -> float:
    """What block sparsity as a mask adds: the Bool mask (heads x T x T, one for all those
    layers) and each block-sparse layer's fp32 attention probabilities (batch x heads x T x T;
    attention on a CPU runs in fp32 under bf16 too), which masked attention keeps for
    backward where the fused causal kernel keeps none (measured: tests/test_planning.py). A
    block-sparse kernel (Phi-3-small's Triton one) would keep neither."""
    if not s.block_sparse_layers:
        return 0.0
    layers = 1 if recompute else s.block_sparse_layers
    return s.block_sparse_mask_heads * seq_len**2 + layers * batch_size * s.n_heads * seq_len**2 * 4.0


def lora_params(s: ModelShape, rank: int) -> int:
    """Adapter parameters: rank x (in + out) beside every attention projection and every
    dense or shared-expert MLP projection, the ones models/lora.py wraps (routed experts,
    router, embedding and head stay frozen without adapters)."""
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    attention = rank * (2 * (s.dim + q) + 2 * (s.dim + kv))

    def mlp(hidden: int) -> int:
        return rank * (s.dim + hidden) * (3 if s.gated_mlp else 2) if hidden else 0

    moe_layers = s.n_layers - s.n_dense_layers if s.n_experts else 0
    return (s.n_layers * attention + (s.n_layers - moe_layers) * mlp(s.ffn_dim)
            + moe_layers * mlp(s.n_shared_experts * s.moe_ffn_dim))


def lora_training_memory(s: ModelShape, batch_size: int, seq_len: int, rank: int, quantized: bool,
                         recompute: bool = False) -> dict[str, float]:
    """Bytes at a LoRA (bf16 base) or QLoRA (NF4 base, `quantized`; the embedding and head stay
    bf16, as QLoRA keeps them) step's peak, bf16 activations. The adapters, their gradients and AdamW moments are fp32; the frozen head
    takes no weight gradient; the projections run one by one (no concatenated q/k/v copies),
    and each adapter keeps its rank-wide intermediate for backward."""
    tokens = batch_size * seq_len
    adapters = lora_params(s, rank)
    embed_head = s.vocab_size * s.dim * (1 if s.tie_embeddings else 2)
    base = (s.params - embed_head) * NF4_BYTES + 2.0 * embed_head if quantized else 2.0 * s.params
    weights = base + 4.0 * adapters
    optimizer = 8.0 * adapters
    grads = 4.0 * adapters
    adapter_values = (4 + (3 if s.gated_mlp else 2)) * rank * (1 if recompute else s.n_layers)
    activations = tokens * (activation_values_per_token(s, recompute) + adapter_values) * 2.0
    activations += block_sparse_memory(s, batch_size, seq_len, recompute)
    loss = head_loss_memory(s, tokens, 2.0) - 4.0 * s.vocab_size * s.dim
    return {"weights": weights, "optimizer": optimizer, "grads": grads, "activations": activations, "loss": loss,
            "total": weights + optimizer + grads + activations + loss, "adapter_params": float(adapters)}


def gpus_needed(estimate: dict[str, float], gpu_bytes: float) -> int | None:
    """GPUs of `gpu_bytes` each for a job, sharded the way the reports run them: training
    with FSDP / ZeRO-3 (weights, gradients and optimizer split over the GPUs, each GPU
    keeping the activations of its own batch), inference with tensor parallelism (weights
    and KV cache split). None when one GPU's share of the activations alone does not fit
    (shorter sequences, activation checkpointing or sequence parallelism are then needed)."""
    usable = gpu_bytes - GPU_RESERVED_BYTES
    if "optimizer" not in estimate:
        return max(1, math.ceil(estimate["total"] / usable))
    per_gpu = estimate["activations"] + estimate["loss"]
    sharded = estimate["weights"] + estimate["optimizer"] + estimate["grads"]
    if per_gpu >= usable:  # only pipeline or sequence parallelism would split it
        return None
    return max(1, math.ceil(sharded / (usable - per_gpu)))


def training_days(flops_per_token: float, tokens: float, n_gpus: int, gpu_peak_flops: float, mfu: float) -> float:
    """Wall-clock days to train on `tokens` at model FLOPs utilisation `mfu` (the FLOPs
    the model needs, over what the GPUs could do at their dense bf16 peak)."""
    return flops_per_token * tokens / (n_gpus * gpu_peak_flops * mfu) / 86_400


def inference_memory(s: ModelShape, batch_size: int, seq_len: int, precision: str = "fp16",
                     kv_precision: str | None = None) -> dict[str, float]:
    """Bytes to generate up to `seq_len` tokens for `batch_size` sequences: weights at
    `precision` (fp32/bf16/fp16/int8/int4), the KV cache, the prompt's last logits."""
    weight_bytes = PRECISION_BYTES[precision]
    kv_bytes = PRECISION_BYTES[kv_precision or ("fp16" if weight_bytes < 2 else precision)]
    weights = s.params * weight_bytes
    per_token = s.latent_kv_dim or 2 * s.n_kv_heads * s.head_dim
    cached_tokens = sum(min(w or seq_len, seq_len) for w in s.layer_windows) if s.layer_windows else s.n_layers * seq_len
    kv_cache = per_token * batch_size * cached_tokens * kv_bytes
    working = batch_size * (s.vocab_size * 4 + 8 * s.dim * kv_bytes)  # one step's logits and hidden states
    if s.materialised_scores:  # the prompt's scores, one layer and query block at a time: measured
        # 3.8-4.5 fp32 T x T matrices per head at the peak (three rotations' scores, then the
        # combined, masked and softmaxed ones, freed as they go)
        working += 4.5 * 4.0 * batch_size * s.n_heads * min(seq_len, DCA_QUERY_BLOCK) * seq_len
    return {"weights": weights, "kv_cache": kv_cache, "working": working, "total": weights + kv_cache + working}


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (for plans printed to people)."""
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.1f} {unit}"
