"""One decoder-only transformer that covers the LLaMA and Qwen3(-MoE) designs.

Read top to bottom: RoPE -> RMSNorm -> attention (with a KV cache) -> SwiGLU MLP and MoE ->
block -> Decoder. The math follows the Hugging Face implementations of those families
step for step (RMSNorm in fp32, rotate-half RoPE, q/k-norm before RoPE, fp32 router
softmax), so exported checkpoints give the same logits in transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_lifecycle.models.config import ModelConfig


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # [B, T, V]
    aux_loss: torch.Tensor  # scalar: MoE load-balancing loss * coef, summed over layers (0 when dense)
    hidden: torch.Tensor | None = None  # [B, T, dim] final-norm states, for value and reward heads


# ---- rotary position embedding -------------------------------------------------------------


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] in fp32, scale applied to cos and sin)."""
    dim, base = cfg.head_dim, cfg.rope_theta
    scaling = cfg.rope_scaling or {}
    kind, factor = scaling.get("type"), float(scaling.get("factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if kind == "ntk":
        # NTK-aware: stretch the base so the lowest frequency covers `factor` x the context
        # while the highest frequencies (local order) stay almost unchanged.
        base = base * factor ** (dim / (dim - 2))
    if kind == "linear":
        # Position interpolation: positions / factor, i.e. every frequency / factor.
        return 1.0 / (base**exponents) / factor, 1.0
    if kind == "yarn":
        return _yarn_frequencies(base**exponents, dim, base, factor, scaling["original_max_seq_len"])
    if kind == "llama3":
        return _llama3_frequencies(1.0 / (base**exponents), factor, scaling), 1.0
    return 1.0 / (base**exponents), 1.0


def _yarn_frequencies(wavelength_base: torch.Tensor, dim: int, base: float, factor: float, original_len: int):
    """YaRN: interpolate the low frequencies, keep the high ones, ramp in between, and
    sharpen attention by the temperature 0.1 ln(factor) + 1 (applied to cos and sin)."""

    def dim_with_rotations(n_rotations: float) -> float:
        # The rotary dimension whose wavelength fits `n_rotations` times in the original context.
        return dim * math.log(original_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_with_rotations(32)), 0)  # beta_fast
    high = min(math.ceil(dim_with_rotations(1)), dim - 1)  # beta_slow
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (unchanged frequency), 0: interpolate (frequency / factor)
    inv_freq = (1.0 / (factor * wavelength_base)) * (1 - keep) + (1.0 / wavelength_base) * keep
    temperature = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, temperature


def _llama3_frequencies(inv_freq: torch.Tensor, factor: float, scaling: dict) -> torch.Tensor:
    """Llama 3.1: wavelengths longer than original_len / low_freq_factor are interpolated
    (/ factor), shorter than original_len / high_freq_factor kept, the band between blended."""
    original_len = scaling["original_max_seq_len"]
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original_len / low, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelength >= original_len / high) & (wavelength <= original_len / low)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions asked, computed in fp32 on every call (cheap, and
    exact at any length). The frequencies are a plain attribute, not a buffer, so casting
    the model to bf16 cannot round them and checkpoints do not carry them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inv_freq, self.scale = rope_frequencies(cfg)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim], the rotate-half layout
        return angles.cos() * self.scale, angles.sin() * self.scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, head_dim]; rotated in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


# ---- normalisation -------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (a bf16 mean of squares loses too much), scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# ---- attention -----------------------------------------------------------------------------


class KVCache:
    """Keys and values of every token seen so far, per layer; `Decoder.forward` appends.

    `key_padding` (Bool[B, S], optional) marks real prompt tokens True and left-padding
    False, so a batch of prompts of different lengths can share one cache. Positions
    past its end are real tokens.
    """

    def __init__(self, n_layers: int, key_padding: torch.Tensor | None = None):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.key_padding = key_padding

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].size(2)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def attention_mask(past: int, n_new: int, key_padding: torch.Tensor | None, device) -> torch.Tensor:
    """Bool mask (True = may attend) for `n_new` queries after `past` cached tokens.

    Causal over absolute positions; padded keys are hidden, except that a query always sees
    itself, so a padding position's own output stays finite (and is never used).
    """
    q_pos = torch.arange(past, past + n_new, device=device)[:, None]
    k_pos = torch.arange(past + n_new, device=device)[None, :]
    allowed = k_pos <= q_pos  # [T, S]
    if key_padding is None:
        return allowed
    extra = past + n_new - key_padding.size(1)
    valid = torch.cat((key_padding, key_padding.new_ones(key_padding.size(0), extra)), dim=1) if extra > 0 else key_padding
    allowed = allowed & (valid[:, None, : past + n_new] | (k_pos == q_pos))  # [B, T, S]
    return allowed[:, None]  # broadcast over heads


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # Qwen3: RMSNorm over each head's q and k (before RoPE) keeps attention logits bounded.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, mask: torch.Tensor | None, kv_cache: KVCache | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


# ---- feed-forward: dense SwiGLU and mixture of experts ---------------------------------------


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts. Expert weights are stacked [n_experts, out, in]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk_prob = cfg.n_experts, cfg.n_experts_per_token, cfg.norm_topk_prob
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(cfg.n_experts, cfg.moe_ffn_dim, cfg.dim))
        self.w_up = nn.Parameter(torch.empty(cfg.n_experts, cfg.moe_ffn_dim, cfg.dim))
        self.w_down = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim, cfg.moe_ffn_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, dim]
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32)  # [N, E]
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        top_probs = top_probs.to(x.dtype)

        # Group the N*k (token, expert) assignments by expert: each expert then runs one
        # matmul on its contiguous slice instead of every expert seeing every token.
        flat_experts = top_experts.flatten()
        order = flat_experts.argsort(stable=True)
        token_of = order // self.top_k
        counts = torch.bincount(flat_experts, minlength=self.n_experts)
        slices = x[token_of].split(counts.tolist())
        expert_out = torch.cat([self._expert(e, tokens) for e, tokens in enumerate(slices)])
        weighted = expert_out * top_probs.flatten()[order, None]
        out = torch.zeros_like(x).index_add_(0, token_of, weighted)

        # Switch-style balance loss n_experts * sum_i f_i P_i: f_i the share of assignments
        # routed to expert i (not differentiable), P_i its mean router probability. 1 when uniform.
        share = counts.float() / flat_experts.numel()
        balance = self.n_experts * (share * probs.mean(dim=0)).sum()
        return out.view(shape), balance

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.w_gate[e])) * F.linear(x, self.w_up[e]), self.w_down[e])


# ---- the model -----------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe else SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, mask, kv_cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv_cache)
        if isinstance(self.ffn, MoE):
            out, balance = self.ffn(self.ffn_norm(x))
            return x + out, balance
        return x + self.ffn(self.ffn_norm(x)), None


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, 0.02); the projections that write into the residual stream (attention
        output, MLP down) scaled by 1/sqrt(2 n_layers) so the stream's variance does not grow
        with depth (GPT-2); norms 1, biases 0."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            elif name.endswith(("wo.weight", "w_down.weight", "ffn.w_down")):
                nn.init.normal_(param, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(param, mean=0.0, std=0.02)

    def new_kv_cache(self, key_padding: torch.Tensor | None = None) -> KVCache:
        return KVCache(self.cfg.n_layers, key_padding)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None) -> DecoderOutput:
        batch, seq = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        positions = torch.arange(past, past + seq, device=input_ids.device)
        cos, sin = self.rope(positions)
        # The fused causal kernel covers plain training/prefill; a cache with earlier tokens
        # or left-padding needs an explicit mask.
        needs_mask = kv_cache is not None and (past > 0 or kv_cache.key_padding is not None)
        mask = attention_mask(past, seq, kv_cache.key_padding, input_ids.device) if needs_mask else None

        x = self.tok_embeddings(input_ids)
        balance = torch.zeros((), device=input_ids.device)
        for layer in self.layers:
            x, layer_balance = layer(x, cos, sin, mask, kv_cache)
            if layer_balance is not None:
                balance = balance + layer_balance
        hidden = self.norm(x)
        logits = self.lm_head(hidden)
        return DecoderOutput(logits=logits, aux_loss=balance * self.cfg.router_aux_loss_coef, hidden=hidden)
