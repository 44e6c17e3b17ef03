"""One decoder-only transformer that covers the designs of the LLaMA, Qwen, Baichuan, GLM,
Mistral/Mixtral, DeepSeek-MoE, Gemma and Phi families, chosen by ModelConfig.

Read top to bottom: positions (RoPE, ALiBi, LogN) -> norms -> attention (masks, sliding
windows, a KV cache) -> MLPs and MoE -> block -> Decoder. The math follows the Hugging Face
implementations of those families step for step (norms in fp32, rotate-half RoPE, q/k-norm
before RoPE, fp32 router softmax), so exported checkpoints give the same logits in transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm_lifecycle.models.config import ModelConfig


@dataclass
class DecoderOutput:
    logits: torch.Tensor | None  # [B, T, V]; None when `targets` were given and the fused loss ran
    # scalar the trainer adds to its loss: MoE balance and z losses times their coefs over
    # layers, plus Baichuan2's max-z loss (0 when none is configured)
    aux_loss: torch.Tensor
    expert_load: torch.Tensor | None = None  # [moe layers, n_experts] assignments per expert (MoE only)
    hidden: torch.Tensor | None = None  # [B, T, dim] final-norm states, for value and reward heads
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over targets != -100, when given


# ---- rotary position embedding -------------------------------------------------------------


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotated dims / 2] in fp32, scale applied to cos and sin).

    The rotated dims are the first rotary_pct of each head (GPT-NeoX / Phi partial rotary);
    with GLM's 2D positions each of the two position ids rotates half of them.
    """
    dim, base = cfg.rotary_dim // (2 if cfg.rope_2d else 1), cfg.rope_theta
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
        inv_freq, temperature = _yarn_frequencies(base**exponents, dim, base, factor, scaling["original_max_seq_len"])
        if "mscale_all_dim" in scaling:  # DeepSeek: the rest of the temperature scales every dim (mla_score_scale)
            temperature = yarn_mscale(factor, scaling["mscale"]) / yarn_mscale(factor, scaling["mscale_all_dim"])
        return inv_freq, temperature
    if kind == "llama3":
        return _llama3_frequencies(1.0 / (base**exponents), factor, scaling), 1.0
    if kind == "longrope":  # the short factors; RotaryEmbedding swaps in the long ones past the original length
        return longrope_frequencies(base**exponents, scaling, long=False)
    return 1.0 / (base**exponents), 1.0


def longrope_frequencies(wavelength_base: torch.Tensor, scaling: dict, long: bool) -> tuple[torch.Tensor, float]:
    """Phi-3's LongRoPE: each frequency divided by its own searched factor (the short list
    while the sequence fits the original length, the long list past it), and cos/sin scaled
    by sqrt(1 + ln(factor) / ln(original length)), or by the given short_mscale / long_mscale
    (Phi-3-small-128k)."""
    kind = "long" if long else "short"
    factors = torch.tensor(scaling[f"{kind}_factor"], dtype=torch.float32)
    return 1.0 / (factors * wavelength_base), float(scaling.get(f"{kind}_mscale", longrope_scale(scaling)))


def longrope_scale(scaling: dict) -> float:
    """LongRoPE's cos/sin scale, sqrt(1 + ln(factor) / ln(original length)), at every length."""
    factor, original = float(scaling["factor"]), scaling["original_max_seq_len"]
    return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0


def yarn_as_longrope(cfg: ModelConfig, factor: float, original_len: int) -> dict[str, list[float]]:
    """LongRoPE factor lists without LongRoPE's search: short factors 1 (the trained frequencies
    while a sequence fits the original length; the cos/sin scale still applies), long factors
    the per-frequency stretch that YaRN's ramp gives (high frequencies kept, low ones
    interpolated by `factor`, a ramp between)."""
    dim = cfg.rotary_dim // (2 if cfg.rope_2d else 1)
    wavelength_base = cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    yarn, _ = _yarn_frequencies(wavelength_base, dim, cfg.rope_theta, factor, original_len)
    long = (1.0 / (wavelength_base * yarn)).tolist()
    return {"short_factor": [1.0] * len(long), "long_factor": long}


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
    return inv_freq, yarn_mscale(factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's temperature 0.1 mscale ln(factor) + 1 (1 when nothing is stretched)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def mla_score_scale(cfg: ModelConfig) -> float:
    """The query-key score scale of MLA: head_dim^-0.5, times yarn_mscale(factor, mscale_all_dim)^2
    under DeepSeek's YaRN (the non-rotated dims sharpened too, as DeepSeek's code does)."""
    scaling = cfg.rope_scaling or {}
    if "mscale_all_dim" not in scaling:
        return cfg.head_dim**-0.5
    return cfg.head_dim**-0.5 * yarn_mscale(float(scaling["factor"]), scaling["mscale_all_dim"]) ** 2


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
    """cos/sin tables in fp32, computed once per length and device and sliced per call.
    The frequencies are a plain attribute, not a buffer, so casting the model to bf16
    cannot round them and checkpoints do not carry them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inv_freq, self.scale = rope_frequencies(cfg)
        self.two_d = cfg.rope_2d
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        scaling = cfg.rope_scaling or {}
        # Dynamic NTK: past the original length L the base grows with the current length l,
        # base * (factor * l / L - (factor - 1)) ** (d / (d - 2)), so the tables depend on l.
        self._dynamic = (float(scaling["factor"]), scaling["original_max_seq_len"], cfg.rope_theta,
                         self.inv_freq.numel() * 2) if scaling.get("type") == "dynamic" else None
        self._dynamic_len = 0
        # LongRoPE: the long factors' frequencies (and cos/sin scale), used once a sequence passes
        # the original length
        self._longrope = None
        if scaling.get("type") == "longrope":
            dim = self.inv_freq.numel() * 2
            wavelength_base = cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
            self._longrope = (scaling["original_max_seq_len"], longrope_frequencies(wavelength_base, scaling, long=True),
                              (self.inv_freq, self.scale))

    def forward(self, start: int, length: int, device: torch.device, position_ids: torch.Tensor | None = None,
                table_len: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (cos, sin_signed) pair per rotated chunk of the head dims (see apply_rope):
        for positions start .. start+length-1, each [length, 1, chunk] (broadcast over
        heads), or for `position_ids` [B, T] — or GLM's [B, 2, T] (position, position inside
        the blank span) — each [B, T, 1, chunk]. `table_len`: a bound on the positions, so
        the table's size need not be read from `position_ids` (a sync a compiled step avoids)."""
        if position_ids is None:
            cos, sin = self._table(start + length, device)
            pairs = [(cos[start : start + length], sin[start : start + length])]
        else:
            ids = [position_ids[:, 0], position_ids[:, 1]] if position_ids.dim() == 3 else [position_ids]
            cos, sin = self._table(table_len or int(position_ids.max()) + 1, device)
            pairs = [(cos[i], sin[i]) for i in ids]
        if self.two_d and len(pairs) == 1:  # text outside a blank has span position 0: no rotation
            pairs.append((cos[:1], sin[:1]))
        return pairs

    def _table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._longrope is not None:
            original, long, short = self._longrope
            wanted, scale = long if length > original else short
            if wanted is not self.inv_freq:  # crossed the original length (either way): new tables
                self.inv_freq, self.scale, self._tables = wanted, scale, {}
        if self._dynamic is not None:
            factor, original, base, dim = self._dynamic
            seen = max(length, original)
            if seen != self._dynamic_len:  # a new length: new base, new tables
                self._dynamic_len, self._tables = seen, {}
                base = base * (factor * seen / original - (factor - 1)) ** (dim / (dim - 2))
                self.inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
        cos, sin = self._tables.get(device, (None, None))
        if cos is None or cos.size(0) < length:
            size = length if self._dynamic is not None else max(length, 2 * (0 if cos is None else cos.size(0)))
            positions = torch.arange(size, device=device)
            freqs = positions.float()[:, None] * self.inv_freq.to(device)[None, :]
            half = freqs.size(-1)
            angles = torch.cat((freqs, freqs), dim=-1)  # [T, chunk], the rotate-half layout
            cos, sin = angles.cos() * self.scale, angles.sin() * self.scale
            sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
            cos, sin = cos[:, None, :], sin[:, None, :]
            self._tables[device] = (cos, sin)
        return cos, sin


def apply_rope(x: torch.Tensor, rope: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """x: [B, T, H, head_dim]; each (cos, sin_signed) pair rotates the next chunk of dims and
    the dims after them pass through (partial rotary). Rotated in fp32, returned in x's dtype.

    The rotate-half form x cos + rotate_half(x) sin with rotate_half(x) = (-x2, x1) equals
    x cos + roll(x) (-sin1, sin2): one roll and one fused multiply-add instead of a negation,
    a concatenation and two products."""
    xf, parts, start = x.float(), [], 0
    for cos, sin_signed in rope:
        chunk = xf[..., start : start + cos.size(-1)]
        parts.append(torch.addcmul(chunk * cos, chunk.roll(chunk.size(-1) // 2, dims=-1), sin_signed))
        start += cos.size(-1)
    if start < x.size(-1):
        parts.append(xf[..., start:])
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(x.dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes, the geometric sequence 2^(-8/n) ... 2^(-8); for a head count
    that is not a power of two, the closest power's slopes plus every other slope of the next
    power's (Press et al.; Baichuan2-13B uses the same)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def logn_scale(positions: torch.Tensor, train_len: int) -> torch.Tensor:
    """Qwen1 LogN attention scaling: a query at 0-based position p > train_len - 1 is scaled
    by log_{train_len}(p + 1), keeping attention entropy steady past the trained length."""
    p = positions.float() + 1
    return torch.where(p > train_len, torch.log(p) / math.log(train_len), torch.ones_like(p))


# ---- normalisation -------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel (3x faster on CPU than the ops spelt out)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Lower precision: normalise in fp32 (a bf16 mean of squares loses too much), round,
        # then scale in the input dtype, as the Hugging Face models do.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.norm == "layernorm" else RMSNorm(dim, cfg.norm_eps)


# ---- attention -----------------------------------------------------------------------------


class KVCache:
    """The two cached tensors of every token seen so far, per layer; `Decoder.forward`
    appends. An attention layer decides what it caches (keys and values; MLA its latent), each
    [B, heads, T, width]. Grows by concatenation: for scoring and chunked prefill. Generation
    uses the preallocated StaticKVCache.

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

    def query_positions(self, n_new: int, device) -> torch.Tensor:
        """Absolute positions [T] of the next `n_new` tokens."""
        return torch.arange(self.length, self.length + n_new, device=device)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class StaticKVCache:
    """A cache allocated once for a whole generation (as gpt-fast and vLLM do): per layer one
    [B, heads, size, width] buffer per cached tensor, and each row's own length.

    Rows keep their own positions, so prompts of different lengths need no padding. Attention
    reads only the buffers' written prefix: `bound`, a host-side int, is the longest row's
    length, so the step needs no device sync to know it (under torch.compile it becomes one
    symbolic size after the first recompile); slots in it that a query may not see (a shorter
    row's unwritten tail) are masked out. Reading the whole preallocated buffer instead costs
    up to 1.5x the attention time of a 64 + 128-token generation, all of it memory traffic.

    A layer with a sliding window W shorter than `max_len` keeps a rolling buffer of W slots
    (Mistral): position p goes to slot p % W, over the key W positions back that no later
    query sees, so its memory stays W tokens however long the generation runs. Other layers
    have `max_len` slots, and p % max_len = p.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: torch.Tensor, max_len: int,
                 bound: int = 0):
        self.keys, self.values, self.lengths = keys, values, lengths  # lengths: Long[B] cached tokens per row
        self.max_len = max_len
        self.bound = bound  # >= every row's length; == the longest row's while rows only advance together

    @classmethod
    def allocate(cls, widths: list[tuple[tuple[int, int], tuple[int, int]]], windows: list[int | None], batch: int,
                 max_len: int, dtype: torch.dtype, device) -> StaticKVCache:
        """`widths`: per layer the (heads, width) of its two cached tensors; `windows`: per layer
        its sliding window or None."""
        def buffer(heads: int, width: int, window: int | None) -> torch.Tensor:
            return torch.zeros(batch, heads, rolling_size(window, max_len), width, dtype=dtype, device=device)

        return cls([buffer(*k, w) for (k, _), w in zip(widths, windows)],
                   [buffer(*v, w) for (_, v), w in zip(widths, windows)],
                   torch.zeros(batch, dtype=torch.long, device=device), max_len)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys + self.values)

    def query_positions(self, n_new: int, device) -> torch.Tensor:
        """Absolute positions [B, 1, T] of each row's next `n_new` tokens (1: broadcast over heads)."""
        return (self.lengths[:, None] + torch.arange(n_new, device=device))[:, None]

    def key_positions(self, size: int, n_new: int) -> torch.Tensor:
        """[B, 1, 1, size]: the position each slot of a `size`-slot buffer (or of the visible
        prefix of a buffer that has not wrapped) holds once the next `n_new` tokens are
        written (negative: not written yet)."""
        last = (self.lengths + n_new - 1)[:, None]
        slots = torch.arange(size, device=last.device)
        return (last - (last - slots) % size)[:, None, None]

    def visible(self, size: int, n_new: int) -> int:
        """How many leading slots of a `size`-slot buffer hold keys once the next `n_new`
        tokens are written: all of them once a rolling buffer has wrapped."""
        return min(size, self.bound + n_new)

    def mask(self, n_new: int, window: int | None) -> torch.Tensor:
        """Bool [B, 1, T, visible]: each new token sees its row's written slots at or before it,
        within `window` positions when the layers have one."""
        size = rolling_size(window, self.max_len)
        q_pos = self.query_positions(n_new, self.lengths.device)[..., None]
        k_pos = self.key_positions(self.visible(size, n_new), n_new)
        allowed = (k_pos >= 0) & (k_pos <= q_pos)
        return allowed if window is None else allowed & (q_pos - k_pos < window)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens [B, heads, T, width] at their rows' positions (modulo a rolling
        buffer's size); the buffers' written prefix comes back."""
        size = self.keys[layer].size(2)
        if size < self.max_len and k.size(2) > 1:  # a later token of the call would overwrite a key an earlier one sees
            raise ValueError("a rolling (sliding-window) cache takes one token per row per step")
        slots = self.query_positions(k.size(2), k.device)[:, 0] % size  # [B, T]
        rows = torch.arange(k.size(0), device=k.device)[:, None]
        # An index_put_ (not scatter_): torch.compile writes it in place, where a scatter into
        # a graph input became a copy of the whole buffer per layer and step.
        self.keys[layer][rows, :, slots] = k.transpose(1, 2)
        self.values[layer][rows, :, slots] = v.transpose(1, 2)
        n = self.visible(size, k.size(2))
        return self.keys[layer][:, :, :n], self.values[layer][:, :, :n]

    def advance(self, n_new: int) -> None:
        self.lengths += n_new
        self.bound += n_new

    def fill(self, rows: torch.Tensor, prefix: KVCache) -> None:
        """Copy a prefilled cache of equal-length rows into these `rows` (of a rolling buffer,
        the last positions that fit, each at its slot)."""
        n = prefix.length
        for buffers, cached in ((self.keys, prefix.keys), (self.values, prefix.values)):
            for layer, t in enumerate(cached):
                size = buffers[layer].size(2)
                if n <= size:
                    buffers[layer][rows, :, :n] = t
                else:  # position n - size + i goes to slot (n - size + i) % size
                    buffers[layer][rows] = torch.roll(t[:, :, n - size :], shifts=(n - size) % size, dims=2)
        self.lengths[rows] = n
        self.bound = max(self.bound, n)

    def select(self, rows: torch.Tensor) -> StaticKVCache:
        """A cache of only these rows (generation drops finished rows this way)."""
        return StaticKVCache([k[rows] for k in self.keys], [v[rows] for v in self.values], self.lengths[rows],
                             self.max_len, self.bound)


def rolling_size(window: int | None, max_len: int) -> int:
    """Slots a layer's static cache needs: its window when shorter than the generation."""
    return max_len if window is None else min(window, max_len)


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


def sliding_window_mask(mask: torch.Tensor, q_pos: torch.Tensor, window: int) -> torch.Tensor:
    """`mask` further limited to the last `window` keys of each query (itself included);
    `q_pos`: the queries' positions, [T] or per row [B, 1, T]."""
    k_pos = torch.arange(mask.size(-1), device=mask.device)
    return mask & (q_pos[..., None] - k_pos < window)


def block_sparse_mask(mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """`mask` ([T, S] or [B, 1, T, S]) further limited to Phi-3-small's block-sparse pattern
    (ModelConfig.blocksparse_block_size), one per head: [(B,) heads, T, S] (homogeneous heads:
    one for all). `q_pos` ([T, 1] or [B, 1, T, 1]) and `k_pos` ([S] or [B, 1, 1, S]): the
    tokens' positions, whose blocks are position // block size."""
    size, stride = cfg.blocksparse_block_size, cfg.blocksparse_vert_stride
    q_block, k_block = q_pos // size, k_pos // size
    local = q_block - k_block < cfg.blocksparse_local_blocks
    heads = 1 if cfg.blocksparse_homo_heads else cfg.n_heads
    shift = torch.arange(heads, device=k_pos.device)[:, None, None] * max(1, stride // cfg.n_heads)  # [heads, 1, 1]
    stripe = (k_block + shift + 1) % stride == 0  # [(B,) heads, 1, S]
    return mask & (local | stripe)


@dataclass
class DualChunkRope:
    """Dual Chunk Attention's rotations (ModelConfig.dca_chunk): the new keys at their
    position inside their chunk; the queries three ways, for the keys of their own chunk
    (`keys` too), of the previous chunk (`successive`) and of earlier ones (`inter`).
    `q_pos`: the queries' absolute positions, [B or 1, 1, T]; `k_pos`: the attended keys',
    [S] or [B or 1, 1, 1, S] (negative: a static cache's slot not written yet)."""

    keys: list[tuple[torch.Tensor, torch.Tensor]]
    successive: list[tuple[torch.Tensor, torch.Tensor]]
    inter: list[tuple[torch.Tensor, torch.Tensor]]
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    chunk: int


def dual_chunk_attention(queries: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, rope: DualChunkRope,
                         mask: torch.Tensor | None, scale: float, block: int = 1024) -> torch.Tensor:
    """softmax(scores + mask) v where each score takes the query rotation its key's chunk
    calls for: (intra, successive, inter) `queries` [B, H, T, D] against keys [B, kv heads, S, D].
    The scores are materialised, `block` query rows at a time (memory block x S per head)."""
    groups = queries[0].size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if mask is None:  # plain causal over the call's own tokens
        mask = attention_mask(0, k.size(2), None, k.device)
    q_chunk = torch.div(rope.q_pos, rope.chunk, rounding_mode="floor")[..., None]
    gap = q_chunk - torch.div(rope.k_pos, rope.chunk, rounding_mode="floor")  # [(B, 1,) T, S] chunks back
    keys_t = k.transpose(-2, -1)
    out = []
    for start in range(0, queries[0].size(2), block):
        rows = slice(start, start + block)
        intra, successive, inter = (q[:, :, rows] @ keys_t for q in queries)
        near = gap[..., rows, :]
        scores = torch.where(near == 0, intra, torch.where(near == 1, successive, inter)) * scale
        scores = scores.float().masked_fill(~mask[..., rows, :], float("-inf"))
        out.append(torch.softmax(scores, dim=-1).to(v.dtype) @ v)
    return torch.cat(out, dim=2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        # Qwen3: RMSNorm over each head's q and k (before RoPE) keeps attention logits bounded.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.alibi = alibi_slopes(cfg.n_heads) if cfg.position == "alibi" else None  # not a buffer, like inv_freq
        self.scale = cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else None  # None: head_dim^-0.5
        self.softcap = cfg.attn_logit_softcap

    def forward(self, x, rope, mask: torch.Tensor | None, kv_cache: KVCache | None,
                q_scale: torch.Tensor | None = None) -> torch.Tensor:
        """`rope`: (cos, sin) chunks (empty with ALiBi); `mask`: Bool[..., T, S] or None for
        plain causal; `q_scale`: per-position query scale [T] or [B, T] (LogN) or None."""
        batch, seq, _ = x.shape
        q, k, v = project(x, self.wq, self.wk, self.wv)
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if isinstance(rope, DualChunkRope):
            queries = [apply_rope(q, r).transpose(1, 2) for r in (rope.keys, rope.successive, rope.inter)]
            k = apply_rope(k, rope.keys)
        elif rope:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if q_scale is not None:
            q = q * q_scale[..., None, None].to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        if self.alibi is not None:
            q_pos = kv_cache.query_positions(seq, x.device) if kv_cache is not None else torch.arange(seq, device=x.device)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)
        if self.alibi is not None:
            k_pos = (kv_cache.key_positions(k.size(2), seq) if isinstance(kv_cache, StaticKVCache)
                     else torch.arange(k.size(2), device=x.device))
            mask = self._alibi_bias(mask, q_pos, k_pos, q.dtype)
        if isinstance(rope, DualChunkRope):
            out = dual_chunk_attention(queries, k, v, rope, mask, self.scale or self.head_dim**-0.5)
            return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))
        out = attention(q, k, v, mask, enable_gqa=self.n_kv_heads != self.n_heads, scale=self.scale, softcap=self.softcap)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    def cache_widths(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, width) of the keys and of the values it caches per token."""
        return (self.n_kv_heads, self.head_dim), (self.n_kv_heads, self.head_dim)

    def _alibi_bias(self, mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype) -> torch.Tensor:
        """ALiBi: slope_h * -(distance to the key), -inf where `mask` forbids attending.
        `q_pos`: the queries' positions, [T] or per row [B, 1, T]; `k_pos`: the keys', [S] or
        per row [B, 1, 1, S] (a rolling cache's slots)."""
        bias = (self.alibi.to(mask.device)[:, None, None] * (k_pos - q_pos[..., None])).to(dtype)  # [(B,) H, T, S]
        return torch.where(mask, bias, torch.tensor(float("-inf"), dtype=dtype, device=mask.device))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3). Keys and values are expanded per head
    from a normalised kv_lora_rank latent; RoPE rotates only a qk_rope_head_dim slice of each
    query and one key slice shared by every head (decoupled RoPE), since a rotation between
    latent and key would keep the expansion from being folded into the query.

    The cache keeps only [latent | rotated key] per token (kv_lora_rank + qk_rope_head_dim
    values, against n_heads * (qk head + v head) expanded). A prompt with nothing cached runs
    the expanded form; tokens after cached ones run the absorbed form of the DeepSeek-V2
    report: the key up-projection folded into the query (q_nope W_uk . latent equals
    q_nope . W_uk latent), attention over the latents as one shared head, and the value
    up-projection applied to the attention output."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_heads = layer_idx, cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank, self.score_scale = cfg.kv_lora_rank, mla_score_scale(cfg)
        q_out = cfg.n_heads * cfg.head_dim
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, q_out, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)

    def cache_widths(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """One shared [latent | rotated key] per token; no separate values (they are the latent)."""
        return (1, self.kv_rank + self.rope_dim), (1, 0)

    def forward(self, x, rope, mask: torch.Tensor | None, kv_cache: KVCache | StaticKVCache | None,
                q_scale: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_a_norm(self.wq_a(x)))
        q_nope, q_rot = q.view(batch, seq, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rot = self.wkv_a(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_norm(latent)
        q_rot, k_rot = apply_rope(q_rot, rope), apply_rope(k_rot.view(batch, seq, 1, self.rope_dim), rope)
        if q_scale is not None:
            q_nope, q_rot = (t * q_scale[..., None, None].to(t.dtype) for t in (q_nope, q_rot))
        fresh = kv_cache is None or (isinstance(kv_cache, KVCache) and kv_cache.keys[self.layer_idx] is None)
        if kv_cache is not None:
            entry = torch.cat((latent, k_rot.squeeze(2)), dim=-1)[:, None]  # [B, 1, T, rank + rope]
            cached, _ = kv_cache.append(self.layer_idx, entry, entry[..., :0])
        if fresh:
            out = self._expanded(q_nope, q_rot, latent, k_rot, mask)
        else:
            out = self._absorbed(q_nope, q_rot, cached, mask)
        return self.wo(out.reshape(batch, seq, -1))

    def _expanded(self, q_nope, q_rot, latent, k_rot, mask) -> torch.Tensor:
        """Per-head keys and values from this call's latents (the cheaper form for a prompt)."""
        batch, seq = latent.shape[:2]
        kv = self.wkv_b(latent).view(batch, seq, self.n_heads, -1)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_rot), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, -1, self.n_heads, -1)), dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, dims]
        out = attention(q, k, v, mask, scale=self.score_scale)
        return out.transpose(1, 2)

    def _absorbed(self, q_nope, q_rot, cached, mask) -> torch.Tensor:
        """Attention straight over the cached latents [B, 1, S, rank + rope]."""
        # int8/int4 weights standing in for the projection give their matrix dequantized
        w_kv = self.wkv_b.weight if type(self.wkv_b) is nn.Linear else self.wkv_b.dequantized(q_nope.dtype)
        w_kv = w_kv.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w_kv.split([self.nope_dim, self.v_dim], dim=1)
        q_latent = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk)
        query = torch.cat((q_latent, q_rot.transpose(1, 2)), dim=-1)  # [B, heads, T, rank + rope]
        # Every head reads the same latents: fold the heads into query rows of one head, so
        # attention never copies the cache per head.
        batch, heads, seq, width = query.shape
        if mask is not None:  # [T, S] or [B, 1, T, S] -> [B, 1, heads * T, S]
            mask = mask.view(-1, 1, *mask.shape[-2:])[:, :, None].expand(-1, -1, heads, -1, -1).flatten(2, 3)
        out = F.scaled_dot_product_attention(
            query.reshape(batch, 1, heads * seq, width), cached, cached[..., : self.kv_rank], attn_mask=mask,
            scale=self.score_scale,
        )
        return torch.einsum("bhtr,hvr->bthv", out.view(batch, heads, seq, -1), w_uv)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              enable_gqa: bool = False, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention, causal when `mask` is None (a Bool mask or an additive
    float bias); `scale` defaults to head_dim^-0.5. On CPU it runs in fp32 even
    under bf16 autocast: PyTorch's CPU flash attention computes bf16 blocks in fp32 after
    converting them, so bf16 inputs only add conversions (forward + backward at head size 32:
    41 ms bf16 vs 32 ms fp32 on an AVX512-BF16 EPYC). The output keeps q's dtype.
    `softcap` (Gemma 2) caps the scores at softcap * tanh(score / softcap), which no fused
    kernel does: the scores are then computed in full."""
    if softcap is not None:
        return _softcapped_attention(q, k, v, mask, scale or q.size(-1) ** -0.5, softcap)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            mask = mask.float() if mask is not None and mask.is_floating_point() else mask
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                 is_causal=mask is None, enable_gqa=enable_gqa, scale=scale)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=enable_gqa,
                                          scale=scale)


def _softcapped_attention(q, k, v, mask, scale: float, softcap: float) -> torch.Tensor:
    """softmax(softcap * tanh(q k^T * scale / softcap) + mask) v, the softmax in fp32."""
    groups = q.size(1) // k.size(1)  # GQA: each key/value head serves `groups` query heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = softcap * torch.tanh(q @ k.transpose(-2, -1) * (scale / softcap))
    if mask is None:
        mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril(k.size(2) - q.size(2))
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def project(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """Several projections of the same input as one matmul (one larger GEMM runs faster than
    three small ones). Quantized stand-ins for nn.Linear run their own kernels one by one."""
    if not all(type(layer) is nn.Linear for layer in linears):
        return tuple(layer(x) for layer in linears)
    weight = torch.cat([layer.weight for layer in linears])
    bias = None if linears[0].bias is None else torch.cat([layer.bias for layer in linears])
    return F.linear(x, weight, bias).split([layer.out_features for layer in linears], dim=-1)


# ---- feed-forward: dense MLPs and mixture of experts ------------------------------------------


def mlp_activation(kind: str):
    """SwiGLU gates with SiLU; GeGLU (Gemma) and the plain GELU MLP (GPT-J, Phi) use GELU's
    tanh approximation, as those checkpoints were trained with."""
    return F.silu if kind == "swiglu" else partial(F.gelu, approximate="tanh")


def gegelu(gate: torch.Tensor, up: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Phi-3-small's GeGeLU: quick GELU, x sigmoid(1.702 x), of the gate clamped above at
    `limit`, times the linear half clamped to [-limit, limit] plus one. Infinities pass
    unclamped, as in the original."""
    if limit is not None:
        gate = torch.where(gate.isinf(), gate, gate.clamp(max=limit))
        up = torch.where(up.isinf(), up, up.clamp(-limit, limit))
    return gate * torch.sigmoid(1.702 * gate) * (up + 1)


class MLP(nn.Module):
    """Gated: w_down(act(w_gate x) * w_up x) (SwiGLU, GeGLU), w_down(gegelu(w_gate x, w_up x))
    (Phi-3-small); plain: w_down(act(w_up x))."""

    def __init__(self, cfg: ModelConfig, hidden: int):
        super().__init__()
        self.act = partial(gegelu, limit=cfg.gegelu_limit) if cfg.mlp == "gegelu" else mlp_activation(cfg.mlp)
        self.two_inputs = cfg.mlp == "gegelu"  # the activation takes gate and up itself
        self.w_gate = nn.Linear(cfg.dim, hidden, bias=cfg.mlp_bias) if cfg.mlp != "gelu" else None
        self.w_up = nn.Linear(cfg.dim, hidden, bias=cfg.mlp_bias)
        self.w_down = nn.Linear(hidden, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_gate is None:
            return self.w_down(self.act(self.w_up(x)))
        gate, up = project(x, self.w_gate, self.w_up)
        return self.w_down(self.act(gate, up) if self.two_inputs else self.act(gate) * up)


@dataclass
class RouterStats:
    """What one MoE layer's router did on this batch; the decoder turns it into losses."""

    mean_prob: torch.Tensor  # [E] mean router probability per expert (differentiable)
    counts: torch.Tensor  # [E] (token, expert) assignments per expert, int64
    z_loss: torch.Tensor  # scalar mean logsumexp(router logits)^2 (ST-MoE), differentiable


class MoE(nn.Module):
    """Top-k routed gated experts, stacked [n_experts, out, in], plus optional shared experts
    that every token passes through (DeepSeekMoE; n of them are one MLP n times as wide).

    Dispatch sorts the N*k (token, expert) assignments by expert, so each expert's tokens
    are one contiguous block; the experts then run as one grouped matmul per projection
    (torch._grouped_mm where the build has a fast kernel, one padded bmm elsewhere), never a
    Python loop over experts.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk_prob = cfg.n_experts, cfg.n_experts_per_token, cfg.norm_topk_prob
        self.act = mlp_activation(cfg.mlp)
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.sigmoid, self.routed_scale = cfg.router_score == "sigmoid", cfg.routed_scale
        self.n_groups, self.topk_groups, self.group_score = cfg.n_expert_groups, cfg.topk_groups, cfg.expert_group_score
        # DeepSeek-V3's balancing bias: steers which experts are chosen, never their weights.
        self.register_buffer("score_bias", torch.zeros(cfg.n_experts) if cfg.router_bias else None)
        self.w_gate = nn.Parameter(torch.empty(cfg.n_experts, cfg.moe_ffn_dim, cfg.dim))
        self.w_up = nn.Parameter(torch.empty(cfg.n_experts, cfg.moe_ffn_dim, cfg.dim))
        self.w_down = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim, cfg.moe_ffn_dim))
        self.shared = MLP(cfg, cfg.n_shared_experts * cfg.moe_ffn_dim) if cfg.n_shared_experts else None
        self.shared_gate = nn.Linear(cfg.dim, 1, bias=False) if cfg.shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, dim]
        logits = self.router(x).float()
        probs, top_probs, top_experts = self._route(logits)

        flat_experts = top_experts.flatten()
        order = flat_experts.argsort(stable=True)
        token_of = order // self.top_k
        # scatter_add, not bincount: a fixed output shape, so torch.compile keeps one graph
        counts = flat_experts.new_zeros(self.n_experts).scatter_add_(0, flat_experts, torch.ones_like(flat_experts))
        expert_out = self._run_experts(x[token_of], flat_experts[order], counts)
        weighted = expert_out * top_probs.flatten()[order, None].to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of, weighted)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:  # Qwen2-MoE: each token decides how much shared expert it takes
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        stats = RouterStats(probs.mean(dim=0), counts, torch.logsumexp(logits, dim=-1).pow(2).mean())
        return out.view(shape), stats

    def _route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router probabilities [N, E], top-k weights [N, k], top-k experts [N, k]), in fp32."""
        scores = logits.sigmoid() if self.sigmoid else F.softmax(logits, dim=-1)
        choice = scores if self.score_bias is None else scores + self.score_bias
        if self.n_groups > 1:  # keep the topk_groups best groups: by their best expert (V2) or best two (V3)
            grouped = choice.view(len(choice), self.n_groups, -1)
            if self.group_score == "max":
                group_scores = grouped.amax(dim=-1)
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            best_groups = group_scores.topk(self.topk_groups, dim=-1).indices
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        top_experts = choice.topk(self.top_k, dim=-1).indices
        top_probs = scores.gather(1, top_experts)
        if self.norm_topk_prob:
            top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        probs = scores / scores.sum(dim=-1, keepdim=True) if self.sigmoid else scores
        return probs, top_probs * self.routed_scale, top_experts

    def _run_experts(self, tokens: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The gated MLP of each row of `tokens` [M, dim] by its expert; rows sorted by expert."""
        # [:] dequantizes all experts at once when int8 weights stand in for the parameters.
        # The grouped matmul is no autocast op: cast here, so the experts run in the autocast
        # dtype as nn.Linear layers would.
        dtype = compute_dtype(tokens)
        tokens = tokens.to(dtype)
        w_gate, w_up, w_down = (w[:].to(dtype) for w in (self.w_gate, self.w_up, self.w_down))
        if _grouped_mm_applies(tokens, w_down.size(-1)):
            offsets = counts.cumsum(0).to(torch.int32)
            gate = grouped_mm(tokens, w_gate.transpose(1, 2), offsets)
            up = grouped_mm(tokens, w_up.transpose(1, 2), offsets)
            return grouped_mm(self.act(gate) * up, w_down.transpose(1, 2), offsets)
        # Padded batch: expert e's rows go to slots e*C .. e*C+count_e-1 of an [E, C, dim]
        # buffer (C the largest count), so one bmm per projection serves every expert.
        capacity = int(counts.max())
        first_row = counts.cumsum(0) - counts
        slots = experts * capacity + torch.arange(len(experts), device=tokens.device) - first_row[experts]
        buffer = tokens.new_zeros(self.n_experts * capacity, tokens.size(-1)).index_copy(0, slots, tokens)
        buffer = buffer.view(self.n_experts, capacity, -1)
        gate_up = torch.bmm(buffer, torch.cat((w_gate, w_up), dim=1).transpose(1, 2))
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = torch.bmm(self.act(gate) * up, w_down.transpose(1, 2))
        return hidden.view(self.n_experts * capacity, -1)[slots]


def _grouped_mm_applies(x: torch.Tensor, ffn_dim: int) -> bool:
    """torch._grouped_mm where it is fast: CUDA bf16 on Hopper or newer (its documented
    limits), and CPU where this torch build has the kernel (one matmul per group, no padding).
    Its operands' rows must start on 16-byte boundaries."""
    if (x.size(-1) * x.element_size()) % 16 or (ffn_dim * x.element_size()) % 16:
        return False
    if x.is_cuda:
        return (x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
                and torch.cuda.get_device_capability(x.device)[0] >= 9)
    return x.device.type == "cpu" and x.dtype in _CPU_GROUPED_MM_DTYPES


def grouped_mm(rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """rows [S, K] in groups (group e ends at offsets[e]), group e times weights[e] [K, N] -> [S, N].

    On CPU through our own op: the CPU kernel handles fp32, but torch.compile's shape rules for
    torch._grouped_mm accept only bf16, so the compiler sees an opaque op with a fake-tensor rule."""
    if rows.is_cuda:
        return torch._grouped_mm(rows, weights, offs=offsets)
    return torch.ops.llm_lifecycle.grouped_mm(rows, weights, offsets)


def _cpu_grouped_mm_dtypes() -> frozenset[torch.dtype]:
    """The dtypes torch._grouped_mm runs in on CPU (torch >= 2.9; older builds lack it).
    Probed once at import, so the check is a constant that torch.compile can trace."""
    works = set()
    for dtype in (torch.float32, torch.bfloat16):
        try:
            torch._grouped_mm(torch.ones(8, 8, dtype=dtype), torch.ones(1, 8, 8, dtype=dtype),
                              offs=torch.tensor([8], dtype=torch.int32))
            works.add(dtype)
        except (AttributeError, RuntimeError, NotImplementedError):
            pass
    return frozenset(works)


_CPU_GROUPED_MM_DTYPES = _cpu_grouped_mm_dtypes()

if _CPU_GROUPED_MM_DTYPES:

    @torch.library.custom_op("llm_lifecycle::grouped_mm", mutates_args=())
    def _cpu_grouped_mm(rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(rows, weights, offs=offsets)

    @_cpu_grouped_mm.register_fake
    def _(rows, weights, offsets):
        return rows.new_empty(rows.size(0), weights.size(-1))

    @torch.library.custom_op("llm_lifecycle::grouped_mm_weight_grad", mutates_args=())
    def _cpu_grouped_mm_weight_grad(rows: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """d(loss)/d(weights) [E, K, N]: group e's rows^T @ its output gradient."""
        return torch._grouped_mm(rows.t(), grad, offs=offsets)

    @_cpu_grouped_mm_weight_grad.register_fake
    def _(rows, grad, offsets):
        return rows.new_empty(offsets.size(0), rows.size(1), grad.size(1))

    def _save_operands(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _grouped_mm_backward(ctx, grad):
        rows, weights, offsets = ctx.saved_tensors
        grad = grad.contiguous()  # the kernel wants 16-byte aligned strides; an expanded gradient has 0
        grad_rows = grouped_mm(grad, weights.transpose(-2, -1), offsets) if ctx.needs_input_grad[0] else None
        grad_weights = (torch.ops.llm_lifecycle.grouped_mm_weight_grad(rows, grad, offsets)
                        if ctx.needs_input_grad[1] else None)
        return grad_rows, grad_weights, None

    _cpu_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_save_operands)


# ---- output head and loss ------------------------------------------------------------------

IGNORE_INDEX = -100  # a target that adds nothing to the loss (prompt tokens, padding)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `x` run in: autocast's where it is on for x's device, else x's own."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """mean cross_entropy(hidden @ weight.T + bias, targets) over targets != IGNORE_INDEX,
    without ever holding the [N, vocab] logits.

    The rows go through in chunks; each chunk's logits become its gradient (softmax minus
    one-hot) in place, and the gradients for hidden, weight and bias are taken right there, so
    the backward pass only scales them. That is one pass over the logits fewer than
    log_softmax + nll + their backward, keeps each chunk in cache (~8 MB of fp32 logits), and
    holds peak memory to one chunk, which matters at 150k-token vocabularies. Under autocast
    the matmuls run in the autocast dtype and the softmax in fp32, like cross_entropy there.
    """
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    dtype = compute_dtype(hidden)
    wanted = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, dtype, wanted)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype, wanted):
        want_hidden, want_weight, want_bias = wanted
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            counted = targets != IGNORE_INDEX
            n_counted = counted.sum().clamp(min=1)
            rows = max(128, (1 << 21) // weight.size(0))
            loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_rows = []
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
            grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
            for start in range(0, hidden.size(0), rows):
                h = hidden[start : start + rows].to(dtype)
                target, keep = targets[start : start + rows].clamp(min=0)[:, None], counted[start : start + rows]
                logits = torch.mm(h, w.t()).float()
                if bias is not None:
                    logits += bias.float()
                target_logit = logits.gather(1, target).squeeze(1)
                row_max = logits.amax(dim=-1, keepdim=True)
                exp = logits.sub_(row_max).exp_()  # in place: the logits are not needed again
                sum_exp = exp.sum(dim=-1)
                loss_sum += ((row_max.squeeze(1) + sum_exp.log() - target_logit) * keep).sum()
                if not any(wanted):
                    continue
                # d(mean loss)/d(logits) = (softmax - one_hot(target)) / n_counted on counted rows
                weight_of_row = (keep / n_counted).to(exp.dtype)
                grad = exp.mul_((weight_of_row / sum_exp)[:, None])
                grad.scatter_add_(1, target, -weight_of_row[:, None])
                if want_bias:
                    grad_b += grad.sum(dim=0)
                grad = grad.to(dtype)
                if want_hidden:
                    grad_rows.append(torch.mm(grad, w).to(hidden.dtype))
                if want_weight:
                    grad_w += torch.mm(grad.t(), h).float()
        ctx.save_for_backward(
            torch.cat(grad_rows) if want_hidden else None,
            grad_w.to(weight.dtype) if want_weight else None,
            grad_b.to(bias.dtype) if want_bias else None,
        )
        return loss_sum / n_counted

    @staticmethod
    def backward(ctx, grad_loss):
        scaled = [None if g is None else g * grad_loss for g in ctx.saved_tensors]
        return (*scaled, None, None, None)


# ---- the model -----------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + ffn(norm(x)); or, with parallel_block (GPT-J,
    Phi), x + attn(norm(x)) + ffn(norm(x)) from one shared norm. With post_norms (GLM-4-0414,
    Gemma 2) each branch's output is normalised too before it joins the stream."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.dim)
        self.attn = LatentAttention(cfg, layer_idx) if cfg.is_mla else Attention(cfg, layer_idx)
        self.ffn_norm = None if cfg.parallel_block else make_norm(cfg, cfg.dim)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg, cfg.ffn_dim)
        self.attn_post_norm = make_norm(cfg, cfg.dim) if cfg.post_norms else nn.Identity()
        self.ffn_post_norm = make_norm(cfg, cfg.dim) if cfg.post_norms else nn.Identity()

    def forward(self, x, rope, mask, kv_cache, q_scale=None) -> tuple[torch.Tensor, RouterStats | None]:
        h = self.attn_norm(x)
        attn = self.attn_post_norm(self.attn(h, rope, mask, kv_cache, q_scale))
        if self.ffn_norm is None:
            out, stats = self._ffn(h)
            return x + attn + out, stats
        x = x + attn
        out, stats = self._ffn(self.ffn_norm(x))
        return x + self.ffn_post_norm(out), stats

    def _ffn(self, h: torch.Tensor) -> tuple[torch.Tensor, RouterStats | None]:
        if isinstance(self.ffn, MoE):
            return self.ffn(h)
        return self.ffn(h), None


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg) if cfg.position == "rope" else None
        self.windows = cfg.layer_windows()
        # which attention mask each layer takes: its window, or "block_sparse" (no window then)
        self.mask_keys = ["block_sparse" if cfg.is_block_sparse_layer(i) else w for i, w in enumerate(self.windows)]
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=cfg.head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        # Training-engine switch: recompute each block's activations in the backward pass
        # instead of keeping them (less memory, about one more forward of compute).
        self.activation_checkpointing = False
        self._step_counts: torch.Tensor | None = None  # [moe layers, E] assignments this optimizer step so far
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

    def new_static_kv_cache(self, batch: int, max_len: int) -> StaticKVCache:
        weight = self.tok_embeddings.weight
        widths = [layer.attn.cache_widths() for layer in self.layers]
        if self.rope is not None:  # build the RoPE tables now, outside any compiled step
            self.rope(0, max_len, weight.device)
        return StaticKVCache.allocate(widths, self.windows, batch, max_len, weight.dtype, weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        kv_cache: KVCache | StaticKVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> DecoderOutput:
        """`attn_mask`: optional Bool[B, T, S] (True = may attend; S = cached + new tokens) in
        place of the causal mask, e.g. GLM's prefix-LM mask. `position_ids`: optional [B, T]
        or, for GLM's 2D positions, [B, 2, T] (position, position inside the blank span).
        `targets`: optional [B, T] next tokens (IGNORE_INDEX to skip one) for `loss`; the
        logits are then left out (None) when the fused head loss applies. `logits_to_keep`:
        > 0 computes the logits of only the last that many positions (generation needs one)."""
        batch, seq = input_ids.shape
        static = isinstance(kv_cache, StaticKVCache)
        past = 0 if kv_cache is None or static else kv_cache.length
        table_len = None
        if static:  # each row at its own position
            if position_ids is None:
                position_ids = kv_cache.query_positions(seq, input_ids.device)[:, 0]
            # a fixed table size keeps the step free of data-dependent shapes (dynamic NTK's
            # tables depend on the length itself)
            table_len = None if (self.cfg.rope_scaling or {}).get("type") == "dynamic" else kv_cache.max_len
        if self.cfg.dca_chunk is not None:
            rope = self._dual_chunk_rope(past, seq, kv_cache, position_ids, input_ids.device)
        elif self.rope is not None:
            rope = self.rope(past, seq, input_ids.device, position_ids, table_len)
        else:
            rope = []
        q_scale = None
        if self.cfg.logn_train_len is not None:
            if position_ids is None:
                absolute = torch.arange(past, past + seq, device=input_ids.device)
            else:
                absolute = position_ids[:, 0] if position_ids.dim() == 3 else position_ids
            q_scale = logn_scale(absolute, self.cfg.logn_train_len)
        masks = self._masks(past, seq, kv_cache, attn_mask, input_ids.device)

        x = self.tok_embeddings(input_ids)
        x = self.scale_embeddings(x)
        routers: list[RouterStats] = []
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer, key in zip(self.layers, self.mask_keys):
            if recompute:
                x, stats = checkpoint(layer, x, rope, masks[key], kv_cache, q_scale, use_reentrant=False)
            else:
                x, stats = layer(x, rope, masks[key], kv_cache, q_scale)
            if stats is not None:
                routers.append(stats)
        if static:
            kv_cache.advance(seq)
        h = self.norm(x[:, -logits_to_keep:] if logits_to_keep else x)
        aux_loss = self._router_loss(routers) if routers else torch.zeros((), device=input_ids.device)
        expert_load = torch.stack([r.counts for r in routers]) if routers else None
        # The fused loss needs the head as a plain weight and no other use of the logits.
        if targets is not None and type(self.lm_head) is nn.Linear and self.cfg.fused_loss_applies:
            loss = linear_cross_entropy(self.head_input(h), self._head_weight(), self._head_bias(), targets)
            return DecoderOutput(logits=None, aux_loss=aux_loss, expert_load=expert_load, hidden=h, loss=loss)
        if self.cfg.norm_head:
            logits = F.linear(h, self._head_weight(), self.lm_head.bias)
        else:
            logits = self.lm_head(h)
        if self.cfg.logit_divisor != 1:  # muP (Phi-3-small): logits / mup_width_multiplier
            logits = logits / self.cfg.logit_divisor
        if self.cfg.final_logit_softcap:  # Gemma 2: logits capped at cap * tanh(logit / cap)
            cap = self.cfg.final_logit_softcap
            logits = cap * torch.tanh(logits / cap)
        if self.cfg.max_z_loss_coef:  # Baichuan2 max-z loss: penalise the largest logit, squared
            aux_loss = aux_loss + self.cfg.max_z_loss_coef * logits.float().amax(dim=-1).pow(2).mean()
        loss = None if targets is None else F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return DecoderOutput(logits=logits, aux_loss=aux_loss, expert_load=expert_load, hidden=h, loss=loss)

    def scale_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the stream takes them: times sqrt(dim) (Gemma: the factor rounded
        to the embedding dtype, as HF does) or muP's embedding_multiplier (Phi-3-small)."""
        if self.cfg.scale_embeddings:
            x = x * torch.tensor(self.cfg.dim**0.5, dtype=x.dtype)
        if self.cfg.embedding_multiplier != 1:
            x = x * self.cfg.embedding_multiplier
        return x

    def _dual_chunk_rope(self, past, seq, kv_cache, position_ids, device) -> DualChunkRope:
        """The rotations and positions Dual Chunk Attention needs for this call's tokens."""
        chunk, window = self.cfg.dca_chunk, self.cfg.dca_local_window
        positions = torch.arange(past, past + seq, device=device)[None] if position_ids is None else position_ids
        inner = positions % chunk  # [B or 1, T]
        largest = chunk + window - 1

        def rotations(ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return self.rope(0, seq, device, ids, table_len=largest + 1)

        if isinstance(kv_cache, StaticKVCache):
            k_pos = kv_cache.key_positions(kv_cache.visible(kv_cache.max_len, seq), seq)  # what attention reads
        elif kv_cache is not None:
            k_pos = torch.arange(past + seq, device=device)
        else:  # the call's own tokens
            k_pos = positions[:, None, None, :]
        return DualChunkRope(
            keys=rotations(inner),
            successive=rotations(torch.where(inner < window, inner + chunk, largest)),
            inter=rotations(torch.full_like(inner, largest)),
            q_pos=positions[:, None], k_pos=k_pos, chunk=chunk,
        )

    def _head_weight(self) -> torch.Tensor:
        if self.cfg.norm_head:  # Baichuan2: unit-norm rows keep the logits' scale in check
            return F.normalize(self.lm_head.weight, dim=-1)
        return self.lm_head.weight

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """The final states as the fused loss's head takes them: muP's logit divisor applied to
        the head's input (and bias, _head_bias) gives the logits divided by it."""
        return h if self.cfg.logit_divisor == 1 else h / self.cfg.logit_divisor

    def _head_bias(self) -> torch.Tensor | None:
        bias = self.lm_head.bias
        return bias if bias is None or self.cfg.logit_divisor == 1 else bias / self.cfg.logit_divisor

    def _masks(self, past, seq, kv_cache, attn_mask, device, keys=None) -> dict[int | str | None, torch.Tensor | None]:
        """The attention mask of each distinct mask key (`keys`, default the layers'): a window
        (None: full causal) or "block_sparse". None (the fused causal kernel) covers plain
        training/prefill; a cache with earlier tokens or left-padding, an explicit mask, a
        window, block sparsity or ALiBi's bias need a mask tensor."""
        keys = set(self.mask_keys if keys is None else keys)
        windows = {k for k in keys if k != "block_sparse"}
        if isinstance(kv_cache, StaticKVCache) and attn_mask is None:  # each window over its own buffer
            masks = {w: kv_cache.mask(seq, w) for w in windows}
            if "block_sparse" in keys:
                k_pos = kv_cache.key_positions(kv_cache.visible(kv_cache.max_len, seq), seq)
                q_pos = kv_cache.query_positions(seq, device)[..., None]
                masks["block_sparse"] = block_sparse_mask(kv_cache.mask(seq, None), q_pos, k_pos, self.cfg)
            return masks
        q_pos = torch.arange(past, past + seq, device=device)
        padding = None if kv_cache is None else kv_cache.key_padding
        if attn_mask is not None:
            base = attn_mask[:, None]
        elif kv_cache is not None and (past > 0 or padding is not None):
            base = attention_mask(past, seq, padding, device)
        elif self.cfg.position == "alibi" or any(windows - {None}):
            base = attention_mask(past, seq, None, device)
        else:
            base = None
        masks = {w: base if w is None else sliding_window_mask(base, q_pos, w) for w in windows}
        if "block_sparse" in keys:
            causal = attention_mask(past, seq, None, device) if base is None else base
            masks["block_sparse"] = block_sparse_mask(causal, *self._token_positions(past, seq, padding, device), self.cfg)
        return masks

    @staticmethod
    def _token_positions(past, seq, padding, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries' positions [T, 1] or [B, 1, T, 1], keys' [S] or [B, 1, 1, S]) as the model
        counts them: a left-padded row's (`padding`: Bool[B, <= S], True for real tokens) from
        its first real token, so padding does not move a token's block."""
        if padding is None:
            return torch.arange(past, past + seq, device=device)[:, None], torch.arange(past + seq, device=device)
        extra = past + seq - padding.size(1)
        real = torch.cat((padding, padding.new_ones(padding.size(0), extra)), dim=1) if extra > 0 else padding
        positions = real[:, : past + seq].long().cumsum(-1) - 1  # [B, S]
        return positions[:, None, past:, None], positions[:, None, None, :]

    def begin_global_batch(self) -> None:
        """Forget the expert counts of the last optimizer step (the trainer calls this before
        each step's first micro-batch) for the global-batch balance loss and the bias update."""
        self._step_counts = None

    @torch.no_grad()
    def end_step(self) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing (the trainer calls this after each
        optimizer step): every MoE layer's score_bias moves by router_bias_update towards
        balance, up for an expert that got fewer than the mean assignments over the step
        (all micro-batches and data-parallel ranks), down for one that got more."""
        if not self.cfg.router_bias_update or self._step_counts is None:
            return
        moe_layers = [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]
        for moe, load in zip(moe_layers, self._step_counts):
            moe.score_bias += self.cfg.router_bias_update * torch.sign(load.mean() - load)

    def _router_loss(self, routers: list[RouterStats]) -> torch.Tensor:
        """coef * balance + z_coef * z-loss, summed over MoE layers.

        Balance (Switch): n_experts * sum_i f_i P_i per layer, f_i the share of assignments
        routed to expert i (not differentiable), P_i its mean router probability; 1 when
        uniform. With moe_balance "global_batch" (Qwen3) f_i counts every micro-batch of
        the step so far on every data-parallel rank, so a micro-batch that specialises is
        not pushed to balance on its own.
        """
        counts = torch.stack([r.counts for r in routers]).float()  # [layers, E]
        global_batch = self.cfg.moe_balance == "global_batch"
        if self.training and (global_batch or self.cfg.router_bias_update):
            step_counts = self._count_step(counts)
            counts = step_counts if global_batch else counts
        share = counts / counts.sum(dim=-1, keepdim=True)
        balance = self.cfg.n_experts * (share * torch.stack([r.mean_prob for r in routers])).sum()
        z_loss = torch.stack([r.z_loss for r in routers]).sum()
        return self.cfg.router_aux_loss_coef * balance + self.cfg.router_z_loss_coef * z_loss

    @torch.no_grad()
    def _count_step(self, counts: torch.Tensor) -> torch.Tensor:
        """The expert counts of the optimizer step so far, over every data-parallel rank."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.clone()
            torch.distributed.all_reduce(counts)
        self._step_counts = counts if self._step_counts is None else self._step_counts + counts
        return self._step_counts
