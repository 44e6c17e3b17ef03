"""The training loop every training stage shares (pretrain, extend-context, SFT, DPO).

AdamW (β 0.9/0.95, ε 1e-8) with decoupled weight decay on matrices only, linear warm-up
then cosine decay to `min_lr_ratio` of the peak, gradient clipping, gradient
accumulation, bf16 autocast where the device supports it, and atomic checkpoints holding
model, optimizer, scheduler and RNG states. Batches are a pure function of the micro-step
index, so a run killed at step k and resumed sees exactly the data it would have seen.
"""

from __future__ import annotations

import math
import pickle
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from llm_lifecycle.registry.hardware import best_device
from llm_lifecycle.workflows.stage import StageContext, UserError, atomic_path

Batch = tuple[torch.Tensor, ...]
# loss_fn(model, batch) -> (loss to minimise, extra scalar metrics)
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]

# Dense bf16 peak FLOP/s by GPU name, for MFU. CPUs have no single published peak.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


@dataclass
class TrainSettings:
    steps: int
    batch_size: int
    seq_len: int
    grad_accum: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    grad_clip: float
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    precision: str
    compile: bool

    @classmethod
    def from_cfg(cls, cfg: dict) -> "TrainSettings":
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__})


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * cosine)


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], s: TrainSettings, device: str) -> torch.optim.AdamW:
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]  # norms and biases are not decayed
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=s.lr, betas=(s.beta1, s.beta2), eps=s.eps, fused=device == "cuda" or None
    )


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16" or (precision == "auto" and device == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_file(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step-{step:08d}.pt"


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    files = sorted(ckpt_dir.glob("step-*.pt"))  # zero-padded: name order is step order
    return files[-1] if files else None


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, keep: int, extra: dict | None = None) -> Path:
    """Write the checkpoint of `step` atomically, then drop all but the newest `keep`."""
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": _rng_state(), **(extra or {})}
    path = checkpoint_file(ckpt_dir, step)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in sorted(ckpt_dir.glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's state: tensors and plain containers only. Anything else (a pickle
    that would run code when loaded) is refused with a UserError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        reason = " ".join(str(err).split())[:160]
        raise UserError(
            f"refused to load checkpoint {path}: it is not a plain tensor checkpoint ({reason}); "
            "it was not executed; delete it (or its folder) to start this stage afresh"
        ) from None


def load_checkpoint(path: Path, model, optimizer) -> int:
    state = read_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return int(state["step"])


def _diverged(ctx: StageContext, description: str, step: int, loss: float, grad_norm: float,
              settings: TrainSettings, ckpt_dir: Path) -> UserError:
    last = latest_checkpoint(ckpt_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    return UserError(
        f"{description}: the training diverged at step {step} (loss {loss:.4g}, gradient norm {grad_norm:.4g}); "
        f"stopped before updating the weights, {kept}; try a lower learning rate "
        f"(--set {ctx.stage}.lr={settings.lr / 10:g}), more warmup_steps, a smaller grad_clip, or precision=fp32"
    )


def _maybe_compile(model: torch.nn.Module, enabled: bool, ctx: StageContext) -> torch.nn.Module:
    if not enabled:
        return model
    try:
        return torch.compile(model)
    except Exception as err:  # compile is an optimisation; eager is always correct
        ctx.progress.log(f"[yellow]torch.compile unavailable ({err}); training eagerly[/yellow]")
        return model


def train(
    ctx: StageContext,
    model: torch.nn.Module,
    settings: TrainSettings,
    batches: Callable[[int], Iterator[Batch]],
    loss_fn: LossFn,
    ckpt_dir: Path,
    flops_per_token: float,
    trainable: list[tuple[str, torch.nn.Parameter]] | None = None,
    description: str = "training",
) -> dict[str, float]:
    """Train `model` for settings.steps optimizer steps, resuming from the latest checkpoint
    in `ckpt_dir` if there is one.

    `batches(start_micro_step)` yields micro-batches from that index on; each batch's first
    tensor is [B, T] inputs, used to count tokens.
    """
    device = best_device()
    model.to(device)
    trainable = trainable or [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, settings, device)
    start = 0
    resume_from = latest_checkpoint(ckpt_dir)
    if resume_from is not None:
        start = load_checkpoint(resume_from, model, optimizer)
        ctx.progress.log(f"  resuming {description} from step {start} ({resume_from.name})")
        ctx.tracker.set_tags({"llm.resumed_from_step": str(start)})
    run_model = _maybe_compile(model, settings.compile, ctx)
    amp = autocast_dtype(settings.precision, device)
    peak = peak_flops(device)
    stream = batches(start * settings.grad_accum)
    recent: list[float] = []
    tokens_seen = 0
    t_start = time.perf_counter()
    model.train()
    with ctx.progress.task(description, total=settings.steps) as bar:
        bar.advance(start)
        for step in range(start, settings.steps):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, settings)
            loss_sum, extras, step_tokens = 0.0, {}, 0
            if hasattr(model, "begin_global_batch"):  # MoE global-batch balancing counts per step
                model.begin_global_batch()
            for _ in range(settings.grad_accum):
                batch = tuple(t.to(device) for t in next(stream))
                with torch.autocast(device_type=device, dtype=amp, enabled=amp is not None):
                    loss, metrics = loss_fn(run_model, batch)
                (loss / settings.grad_accum).backward()
                loss_sum += loss.item() / settings.grad_accum
                step_tokens += batch[0].numel()
                for k, v in metrics.items():
                    extras[k] = extras.get(k, 0.0) + v / settings.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], settings.grad_clip)
            if not (math.isfinite(loss_sum) and math.isfinite(float(grad_norm))):
                raise _diverged(ctx, description, step, loss_sum, float(grad_norm), settings, ckpt_dir)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            tokens_seen += step_tokens
            recent = (recent + [loss_sum])[-10:]
            bar.advance(1)
            if step % settings.log_every == 0 or step == settings.steps - 1:
                tps = step_tokens / dt
                metrics = {"loss": loss_sum, "lr": optimizer.param_groups[0]["lr"],
                           "grad_norm": float(grad_norm), "tokens_per_s": tps,
                           "model_flops_per_s": tps * flops_per_token, "peak_memory_mb": peak_memory_mb(device),
                           **extras}
                if peak:
                    metrics["mfu"] = tps * flops_per_token / peak
                ctx.tracker.log_metrics(metrics, step=step)
                bar.update(description=f"{description} loss {loss_sum:.3f}")
            if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
                save_checkpoint(ckpt_dir, step + 1, model, optimizer, settings.keep_checkpoints)
    elapsed = time.perf_counter() - t_start
    model.eval()
    return {
        "final_loss": sum(recent) / max(1, len(recent)),
        "train_tokens": float(tokens_seen),
        "train_time_s": elapsed,
        "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else 0.0,
    }


def lm_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy (targets of -100 are ignored) plus the model's aux_loss (MoE
    balance, max-z). A batch is (inputs, targets), or (inputs, targets, position_ids,
    attn_mask) for objectives with their own positions and mask (GLM blank infilling)."""
    inputs, targets = batch[0], batch[1]
    out = model(inputs, position_ids=batch[2], attn_mask=batch[3]) if len(batch) == 4 else model(inputs)
    ce = torch.nn.functional.cross_entropy(
        out.logits.float().view(-1, out.logits.size(-1)), targets.reshape(-1), ignore_index=-100
    )
    aux = out.aux_loss
    return ce + aux, {"ce_loss": ce.item(), "aux_loss": float(aux.detach())}
