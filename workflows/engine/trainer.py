"""The training loop every training stage shares (pretrain, extend-context, SFT, DPO).

AdamW (β 0.9/0.95, ε 1e-8) with decoupled weight decay on matrices only, linear warm-up
then cosine decay to `min_lr_ratio` of the peak, gradient clipping, gradient
accumulation, bf16 autocast with fp32 master weights where the device runs bf16 natively
(GPUs; CPUs with AMX or AVX512-BF16), torch.compile (with a fallback to eager) and
activation checkpointing as switches, FSDP2 under torchrun, and atomic
checkpoints holding model, optimizer, scheduler, RNG states and the data position. Batches
are a pure function of the micro-step index, so a run killed at step k and resumed sees
exactly the data it would have seen and produces the same losses.

Checkpoints are `checkpoints/step-NNNNNNNN.pt`, the newest `keep_checkpoints` kept, each
with its sha256 beside it (`step-NNNNNNNN.pt.sha256`, written before the checkpoint lands).
A resumed run loads the newest checkpoint that verifies: one that is truncated or changed
since it was written is named and skipped, and the one before it is used. Loading is
`torch.load(weights_only=True)`: a file that needs arbitrary unpickling is refused (an
error, not a skip: somebody put it there), never run. A non-finite loss or gradient stops training before the optimizer step, so the
newest checkpoint on disk is the last good one.
"""

from __future__ import annotations

import copy
import hashlib
import math
import pickle
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from llm_lifecycle.models.decoder import IGNORE_INDEX
from llm_lifecycle.registry.hardware import cpu_has_native_bf16
from llm_lifecycle.workflows.engine import distributed
from llm_lifecycle.workflows.runner.settings import (
    AT_LEAST_1,
    BELOW_1,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Limit,
    Settings,
    setting,
)
from llm_lifecycle.workflows.runner.stage import StageContext, UserError, atomic_path

Batch = tuple[torch.Tensor, ...]
# loss_fn(model, batch) -> (loss to minimise, extra scalar metrics)
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]

# Dense bf16 peak FLOP/s by GPU name, for MFU. CPUs have no single published peak.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


@dataclass
class TrainSettings(Settings):
    """What every training stage's settings start from (pretrain, extend-context, sft, rl, distill)."""

    steps: int = setting(200, "optimizer steps", limit=AT_LEAST_1)
    batch_size: int = setting(8, "sequences per micro-batch, per process", limit=AT_LEAST_1)
    seq_len: int = setting(256, "tokens per training sequence",
                           limit=Limit(lambda v: v >= 2, "an integer >= 2 (an input and its next-token target)"))
    grad_accum: int = setting(1, "micro-batches per optimizer step", limit=AT_LEAST_1)
    lr: float = setting(1e-3, "peak learning rate, reached after warmup_steps", limit=POSITIVE)
    min_lr_ratio: float = setting(0.1, "cosine decay ends at lr * min_lr_ratio", limit=FRACTION)
    warmup_steps: int = setting(20, "linear warm-up steps", limit=NON_NEGATIVE)
    weight_decay: float = setting(0.1, "AdamW weight decay", limit=NON_NEGATIVE)
    beta1: float = setting(0.9, "AdamW beta1", limit=BELOW_1)
    beta2: float = setting(0.95, "AdamW beta2", limit=BELOW_1)
    eps: float = setting(1e-8, "AdamW epsilon", limit=POSITIVE)
    grad_clip: float = setting(1.0, "clip the gradient norm to this", limit=POSITIVE)
    checkpoint_every: int = setting(50, "steps between checkpoints (a killed run resumes from the last)",
                                    limit=AT_LEAST_1)
    keep_checkpoints: int = setting(2, "the newest K checkpoints stay on disk", limit=AT_LEAST_1)
    log_every: int = setting(10, "steps between logged metrics", limit=AT_LEAST_1)
    precision: str = setting("auto", "auto: bf16 autocast where bf16 is native (GPUs, CPUs with AMX/AVX512-BF16), "
                                     "else fp32",
                             choices=("auto", "fp32", "bf16"))
    compile: bool = setting(False, "torch.compile the model (falls back to eager if compiling fails)")
    activation_checkpointing: bool = setting(False, "recompute block activations in backward: less memory")


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * cosine)


def fused_adamw_available(device: str) -> bool:
    """Whether torch has the single-kernel (fused) AdamW for `device` (CUDA; CPU since torch 2.4)."""
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], s: TrainSettings, device: str) -> torch.optim.AdamW:
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]  # norms and biases are not decayed
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=s.lr, betas=(s.beta1, s.beta2), eps=s.eps, fused=fused_adamw_available(device) or None
    )


def make_scheduler(optimizer: torch.optim.Optimizer, s: TrainSettings) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, s) / s.lr)


def native_bf16(device: str) -> bool:
    """Whether `device` runs bf16 matmuls in hardware: GPUs that support bf16, CPUs with
    AMX or AVX512-BF16 (elsewhere bf16 is emulated and no faster than fp32)."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return device == "cpu" and cpu_has_native_bf16()


def resolve_precision(precision: str, device: str) -> str:
    """The precision a run trains in: `auto` is bf16 autocast where bf16 is native, else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """bf16 autocast (weights, gradients and AdamW states stay fp32), or None for plain fp32."""
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else None


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


def peak_memory_mb(device: str) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def _rng_state() -> dict:
    # numpy's state as a tensor and plain numbers: a weights_only load accepts nothing else.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_file(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step-{step:08d}.pt"


def checksum_file(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".sha256")


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("step-*.pt"))  # zero-padded: name order is step order


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    files = checkpoints(ckpt_dir)
    return files[-1] if files else None


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, data_position: int, keep: int) -> None:
    """Everything a resumed run needs to continue exactly: weights, optimizer moments, the
    schedule, every RNG and how many micro-batches were consumed. Under FSDP the full
    state is gathered and rank 0 writes it (atomically), so the file is the same as one
    process would write and a run may resume with another number of processes. Only the
    newest `keep` checkpoints stay."""
    model_state, optim_state = distributed.full_state_dicts(model, optimizer)
    if not distributed.is_main_process():
        return
    state = {"step": step, "model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
             "rng": _rng_state(), "data_position": data_position}
    path = checkpoint_file(ckpt_dir, step)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        with atomic_path(checksum_file(path)) as tmp_sum:  # lands first: a checkpoint never lacks its checksum
            tmp_sum.write_text(sha256(tmp) + "\n", encoding="ascii")
    for old in checkpoints(ckpt_dir)[:-keep]:
        old.unlink()
        checksum_file(old).unlink(missing_ok=True)


class DamagedCheckpoint(Exception):
    """A checkpoint that does not hold what was written: truncated, or changed since."""


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's state, if it verifies against its checksum (checkpoints from before
    checksums have none) and holds tensors and plain containers only. A damaged file
    raises DamagedCheckpoint; a pickle that would run code when loaded is refused with a
    UserError."""
    sums = checksum_file(path)
    if sums.is_file() and sha256(path) != sums.read_text(encoding="ascii").strip():
        raise DamagedCheckpoint(f"its sha256 differs from {sums.name}, written with it: truncated or changed since")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = " ".join(str(err).split())[:160]
        raise UserError(
            f"refused to load checkpoint {path}: it is not a plain tensor checkpoint ({reason}); "
            "it was not executed; delete that file to resume from the checkpoint before it"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise DamagedCheckpoint(" ".join(str(err).split())[:160]) from None


def read_newest_good_checkpoint(ckpt_dir: Path, log: Callable[[str], None]) -> tuple[Path, dict] | None:
    """(path, state) of the newest checkpoint that verifies; newer damaged ones are reported
    and left on disk (the run writes over them as it passes their step)."""
    for path in reversed(checkpoints(ckpt_dir)):
        try:
            return path, read_checkpoint(path)
        except DamagedCheckpoint as err:
            log(f"  [yellow]checkpoint {path} is damaged ({err}); not loaded, trying the one before it[/yellow]")
    return None


def restore(state: dict, model, optimizer, scheduler) -> tuple[int, int]:
    """Restore a checkpoint's state; returns (optimizer step, data position in micro-batches)."""
    distributed.load_full_state_dicts(model, optimizer, state["model"], state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["step"]), int(state["data_position"])


def _diverged(ctx: StageContext, description: str, step: int, loss: float, grad_norm: float,
              settings: TrainSettings, ckpt_dir: Path) -> UserError:
    last = latest_checkpoint(ckpt_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    return UserError(
        f"{description}: the training diverged at step {step} (loss {loss:.4g}, gradient norm {grad_norm:.4g}); "
        f"stopped before updating the weights, {kept}; try a lower learning rate "
        f"(--set {ctx.stage}.lr={settings.lr / 10:g}), more warmup_steps, a smaller grad_clip, or precision=fp32"
    )


class CompiledWithFallback:
    """torch.compile(model), falling back to the eager model if compiling fails.

    torch.compile is lazy: Dynamo and Inductor errors (no C compiler, an unsupported op)
    surface on the first call, so that call is the one guarded. Later errors are real and
    raised. Attribute access reaches the model, so loss functions may use it as the model.
    """

    def __init__(self, model: torch.nn.Module, log: Callable[[str], None] = print):
        self.model, self.log = model, log
        self.compiled: Callable | None = torch.compile(model)
        self.first_call_done = False

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.model(*args, **kwargs)
        if self.first_call_done:
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as err:  # compile is an optimisation; eager is always correct
            self.log(f"torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); training eagerly")
            self.compiled = None
            return self.model(*args, **kwargs)
        self.first_call_done = True
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)


def maybe_compile(model: torch.nn.Module, enabled: bool, log: Callable[[str], None] = print):
    return CompiledWithFallback(model, log) if enabled else model


def expert_load_metrics(expert_load: torch.Tensor) -> dict[str, float]:
    """Per MoE layer, the busiest and idlest expert's share relative to a uniform split
    (1.0 = perfectly balanced; max 2.0 = that expert got twice its fair share)."""
    load = expert_load.float()
    relative = load / load.mean(dim=-1, keepdim=True).clamp(min=1e-9)
    metrics = {}
    for i, row in enumerate(relative.tolist()):
        metrics[f"moe.layer{i}.max_load"] = max(row)
        metrics[f"moe.layer{i}.min_load"] = min(row)
    return metrics


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
    """Train `model` for settings.steps optimizer steps, resuming from the newest checkpoint
    in `ckpt_dir` if there is one.

    `batches(start_micro_step)` yields global micro-batches from that index on; each batch's
    first tensor is [B, T] inputs, used to count tokens. Under torchrun each rank takes its
    own rows of every micro-batch (batch_size must divide by the world size) and the model
    is sharded with FSDP2, so N processes follow the same loss curve as one.
    """
    device = distributed.device()
    world = distributed.world_size()
    result_model = model.to(device)
    if hasattr(model, "activation_checkpointing"):
        model.activation_checkpointing = settings.activation_checkpointing
    names = {n for n, _ in trainable} if trainable else {n for n, p in model.named_parameters() if p.requires_grad}
    if world > 1:  # train a sharded copy; the caller's model receives the full weights at the end
        model = distributed.shard_model(copy.deepcopy(model))
    trainable = [(n, p) for n, p in model.named_parameters() if n in names]
    optimizer = make_optimizer(trainable, settings, device)
    scheduler = make_scheduler(optimizer, settings)
    start, data_position = 0, 0
    resumed = read_newest_good_checkpoint(ckpt_dir, ctx.progress.log)
    if resumed is not None:
        resume_from, state = resumed
        start, data_position = restore(state, model, optimizer, scheduler)
        ctx.progress.log(f"  resuming {description} from step {start} ({resume_from.name})")
        ctx.tracker.set_tags({"llm.resumed_from_step": str(start)})
    run_model = maybe_compile(model, settings.compile, ctx.progress.log)
    amp = autocast_dtype(settings.precision, device)
    peak = peak_flops(device)
    stream = (distributed.rank_rows(b) for b in batches(data_position))
    recent: list[float] = []
    tokens_seen = 0
    t_start = time.perf_counter()
    model.train()
    with ctx.progress.task(description, total=settings.steps) as bar:
        bar.advance(start)
        for step in range(start, settings.steps):
            t0 = time.perf_counter()
            if hasattr(model, "begin_global_batch"):  # MoE global-batch balancing counts per step
                model.begin_global_batch()
            loss_sum, extras, step_tokens = 0.0, {}, 0
            for micro in range(settings.grad_accum):
                batch = tuple(t.to(device) for t in next(stream))
                data_position += 1
                # Under FSDP, reduce gradients across ranks once per step, not per micro-batch.
                distributed.sync_gradients(model, micro == settings.grad_accum - 1)
                with torch.autocast(device_type=device, dtype=amp, enabled=amp is not None):
                    loss, metrics = loss_fn(run_model, batch)
                (loss / settings.grad_accum).backward()
                loss_sum += loss.item() / settings.grad_accum
                step_tokens += batch[0].numel() * world
                for k, v in metrics.items():
                    extras[k] = extras.get(k, 0.0) + v / settings.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], settings.grad_clip)
            if not (math.isfinite(loss_sum) and math.isfinite(float(grad_norm))):
                raise _diverged(ctx, description, step, loss_sum, float(grad_norm), settings, ckpt_dir)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            if hasattr(model, "end_step"):  # DeepSeek-V3: expert biases follow the step's load
                model.end_step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum = distributed.mean_across_ranks(loss_sum)
            dt = time.perf_counter() - t0
            tokens_seen += step_tokens
            recent = (recent + [loss_sum])[-10:]
            bar.advance(1)
            if step % settings.log_every == 0 or step == settings.steps - 1:
                tps = step_tokens / dt
                metrics = {"loss": loss_sum, "lr": lr, "grad_norm": float(grad_norm), "step_time_s": dt,
                           "tokens_per_s": tps, "model_flops_per_s": tps * flops_per_token,
                           "peak_memory_mb": peak_memory_mb(device), **extras}
                if peak:
                    metrics["mfu"] = tps * flops_per_token / (peak * world)
                ctx.tracker.log_metrics(metrics, step=step)
                bar.update(description=f"{description} loss {loss_sum:.3f}")
            if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
                save_checkpoint(ckpt_dir, step + 1, model, optimizer, scheduler, data_position,
                                settings.keep_checkpoints)
    elapsed = time.perf_counter() - t_start
    if world > 1:
        result_model.load_state_dict(distributed.full_model_state(model))
    result_model.eval()
    return {
        "final_loss": sum(recent) / max(1, len(recent)),
        "train_tokens": float(tokens_seen),
        "train_time_s": elapsed,
        "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else 0.0,
    }


def lm_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy (targets of -100 are ignored) plus the model's aux_loss (MoE
    balance and z-loss, max-z). A batch is (inputs, targets), or (inputs, targets,
    position_ids, attn_mask) for objectives with their own positions and mask (GLM blank infilling)."""
    inputs, targets = batch[0], batch[1]
    extra = {"position_ids": batch[2], "attn_mask": batch[3]} if len(batch) == 4 else {}
    out = model(inputs, targets=targets, **extra)
    ce, aux = out.loss, out.aux_loss
    metrics = {"ce_loss": ce.item(), "aux_loss": float(aux.detach())}
    if out.expert_load is not None:
        metrics.update(expert_load_metrics(out.expert_load))
    return ce * distributed.target_share(targets, IGNORE_INDEX) + aux, metrics
