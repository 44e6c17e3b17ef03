"""Training throughput: our decoder + trainer step against Hugging Face transformers' model
of the same architecture and size, in the same process, eager and compiled, in fp32 and
with bf16 autocast.

    python benches/train_throughput.py [--quick] [--mode eager|compiled|both]
        [--precision fp32|bf16|both] [--models llama,moe] [--heldout]

One training step = forward, next-token cross-entropy, backward, gradient clipping and an
AdamW step, at batch 8 x 256. Both sides get the same optimizer (fused AdamW where torch
has it), the same config and the same initial weights (ours converted to the HF layout).
bf16 is CPU autocast on both sides with fp32 weights and optimizer (our trainer's
`precision: bf16`). Steps of every side alternate in rounds so machine noise hits all; the
median step time is reported. The model FLOP/s (config FLOPs per token x tokens/s, MoE
counting active parameters) is put beside this machine's best 2048^3 matmul rate in the
same precision, measured before and after in the same run.

The ceiling column bounds what any rewrite of our step could reach against this peer with
the same kernels: the peer's step time over the time our step spends inside matmul and
attention kernels alone (torch.profiler self time of one step), as if everything else
(norms, activations, RoPE, the loss, the optimizer) cost nothing.

--heldout also runs the default pipeline (qwen3-moe-small) through pretrain once per
precision, in a fresh workspace, and reports each pretrain's held-out loss and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder
from llm_lifecycle.models.hf import ENDOFTEXT, hf_config, to_hf_state_dict
from llm_lifecycle.registry.hardware import hardware_profile
from llm_lifecycle.workflows.engine.trainer import fused_adamw_available, lm_loss, maybe_compile

# ~7-8M parameters each: the preset designs, sized up (llama) or trimmed (MoE) to that size.
CONFIGS = {
    "llama": ModelConfig(family="llama", vocab_size=4096, dim=256, n_layers=8, n_heads=8, n_kv_heads=4,
                         ffn_dim=688, max_seq_len=256),
    "moe": ModelConfig(family="qwen3_moe", vocab_size=4096, dim=256, n_layers=3, n_heads=8, n_kv_heads=4,
                       qk_norm=True, tie_embeddings=False, n_experts=8, n_experts_per_token=2, moe_ffn_dim=256,
                       norm_eps=1e-6, max_seq_len=256),
}
BATCH, SEQ = 8, 256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_flops_per_s(precision: str, clock=time.perf_counter, n: int = 2048, repeats: int = 10) -> float:
    """The best of `repeats` runs: the machine's rate (noise from other tenants only slows it)."""
    a, b = torch.randn(n, n, dtype=DTYPES[precision]), torch.randn(n, n, dtype=DTYPES[precision])
    a @ b
    times = []
    for _ in range(repeats):
        t0 = clock()
        a @ b
        times.append(clock() - t0)
    return 2 * n**3 / min(times)


KERNEL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "aten::_scaled_dot_product")


def kernel_seconds(step, batch) -> float:
    """Seconds one step spends in matmul and attention kernels (their profiler self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith(KERNEL_OPS)) / 1e6


def hf_model(cfg: ModelConfig, ours: Decoder) -> torch.nn.Module:
    import transformers

    d = hf_config(cfg, {ENDOFTEXT: 0})
    arch = d.pop("architectures")[0]
    config_cls = transformers.LlamaConfig if cfg.family == "llama" else transformers.Qwen3MoeConfig
    model = getattr(transformers, arch)(config_cls(**{k: v for k, v in d.items() if k != "model_type"}))
    state = to_hf_state_dict(cfg, ours.state_dict())
    if cfg.is_moe:  # transformers 5 stacks the experts: gate_up_proj [E, 2F, D], down_proj [E, D, F]
        for layer in range(cfg.n_layers):
            prefix = f"model.layers.{layer}.mlp.experts"
            per = [[state.pop(f"{prefix}.{e}.{name}.weight") for name in ("gate_proj", "up_proj", "down_proj")]
                   for e in range(cfg.n_experts)]
            state[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat(w[:2]) for w in per])
            state[f"{prefix}.down_proj"] = torch.stack([w[2] for w in per])
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model


def make_step(model: torch.nn.Module, forward, compile_: bool, precision: str = "fp32"):
    """A closure running one full training step on `batch` (under bf16 autocast for bf16)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused_adamw_available("cpu") or None)
    run = maybe_compile(model, compile_)

    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward(run, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def ours_forward(model, batch):
    return lm_loss(model, batch)[0]


def hf_forward(model, batch):
    inputs, targets = batch
    logits = model(input_ids=inputs).logits
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def bench_model(name: str, compile_: bool, precisions: list[str], rounds: int, steps_per_round: int,
                warmup: int, clock=time.perf_counter) -> list[dict]:
    """Ours and the peer in each precision, all sides alternating: one result per precision."""
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    initial = Decoder(cfg).state_dict()
    sides = {}
    for precision in precisions:  # every side trains its own copy of the same initial weights
        ours = Decoder(cfg)
        ours.load_state_dict(initial)
        sides["ours", precision] = make_step(ours, ours_forward, compile_, precision)
        sides["hf", precision] = make_step(hf_model(cfg, ours), hf_forward, compile_, precision)
    data = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    batch = (data[:, :-1].contiguous(), data[:, 1:].contiguous())
    for step in sides.values():  # compile and warm the allocator outside the timing
        for _ in range(warmup):
            step(batch)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in sides}
    for _ in range(rounds):
        for side, step in sides.items():
            for _ in range(steps_per_round):
                t0 = clock()
                step(batch)
                times[side].append(clock() - t0)
    tps = {side: BATCH * SEQ / statistics.median(t) for side, t in times.items()}
    results = []
    for precision in precisions:
        ours, hf = tps["ours", precision], tps["hf", precision]
        ceiling = statistics.median(times["hf", precision]) / kernel_seconds(sides["ours", precision], batch)
        results.append({
            "model": name, "mode": "compiled" if compile_ else "eager", "precision": precision,
            "params_m": cfg.num_params() / 1e6, "active_params_m": cfg.active_params() / 1e6,
            "ours_tokens_per_s": ours, "hf_tokens_per_s": hf, "ratio": ours / hf, "ceiling": ceiling,
            "vs_ours_fp32": ours / tps["ours", "fp32"] if "fp32" in precisions else None,
            "ours_model_flops_per_s": ours * cfg.flops_per_token(SEQ)})
    return results


def heldout_losses(precisions: list[str], recipe: str = "qwen3-moe-small") -> list[dict]:
    """The default pipeline through pretrain, once per precision, in one fresh workspace (the
    data, tokenizer and shards are made once and reused): each pretrain's held-out loss
    (log of its held-out perplexity) and training tokens/s."""
    stages = "data-fetch,data-clean,tokenizer-train,tokenize,pretrain"
    rows = []
    with tempfile.TemporaryDirectory(prefix="bf16-heldout-") as home:
        env = {**os.environ, "LLM_HOME": home, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        for precision in precisions:
            cmd = [sys.executable, "-m", "llm_lifecycle.cli.app", "pipeline", recipe, "--stages", stages,
                   "--set", f"pretrain.precision={precision}"]
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            newest = max(Path(home).glob(f"{recipe}/pretrain/*/result.json"), key=lambda p: p.stat().st_mtime)
            metrics = json.loads(newest.read_text())["result"]["metrics"]
            rows.append({"precision": precision, "heldout_loss": math.log(metrics["heldout_ppl"]),
                         "heldout_ppl": metrics["heldout_ppl"], "tokens_per_s": metrics["tokens_per_s"]})
    return rows


def profile_ours(name: str) -> None:
    """Where our eager training step spends its time, op by op (to find overheads)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = Decoder(cfg)
    step = make_step(model, ours_forward, False)
    data = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1))
    batch = (data[:, :-1].contiguous(), data[:, 1:].contiguous())
    step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def print_machine() -> None:
    hw = hardware_profile()
    print(f"{hw['hw.cpu']}, torch on {torch.get_num_threads()} of {hw['hw.cpu_threads']} threads; instruction sets {hw['hw.cpu_isa']}; "
          f"native bf16: {hw['hw.cpu_native_bf16']}; torch {torch.__version__} ({hw['hw.torch_cpu_kernels']} kernels)")


def print_throughput(results: list[dict], matmul: dict[str, float]) -> None:
    print("best 2048^3 matmul: " + ", ".join(f"{p} {r / 1e9:.1f} GFLOP/s" for p, r in matmul.items()))
    print("| model | params (active) | mode | precision | ours tok/s | HF tok/s | ours / HF | ceiling | "
          "ours / ours fp32 | ours model FLOP/s / matmul |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        r["matmul_flops_per_s"] = matmul[r["precision"]]
        r["matmul_share"] = r["ours_model_flops_per_s"] / r["matmul_flops_per_s"]
        vs_fp32 = f"{r['vs_ours_fp32']:.2f}x" if r["vs_ours_fp32"] else "-"
        print(f"| {r['model']} | {r['params_m']:.1f}M ({r['active_params_m']:.1f}M) | {r['mode']} | "
              f"{r['precision']} | {r['ours_tokens_per_s']:.0f} | {r['hf_tokens_per_s']:.0f} | {r['ratio']:.2f}x | "
              f"{r['ceiling']:.2f}x | {vs_fp32} | {r['matmul_share']:.0%} |")


def print_heldout(rows: list[dict]) -> None:
    base = next((r for r in rows if r["precision"] == "fp32"), rows[0])
    print("| pretrain precision | held-out loss | vs fp32 | held-out ppl | pretrain tok/s | vs fp32 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['heldout_loss']:.4f} | {r['heldout_loss'] / base['heldout_loss'] - 1:+.2%} | "
              f"{r['heldout_ppl']:.1f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, noisier)")
    parser.add_argument("--mode", choices=("eager", "compiled", "both"), default="both")
    parser.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    parser.add_argument("--models", default="llama,moe", help="comma-separated: llama, moe")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: one thread, steps timed in process CPU seconds (for a machine others are loading)")
    parser.add_argument("--heldout", action="store_true",
                        help="also pretrain the default pipeline in each precision and compare held-out losses")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--profile", choices=tuple(CONFIGS), help="instead: torch.profiler table of our eager step")
    args = parser.parse_args()
    if args.profile:
        profile_ours(args.profile)
        return
    rounds, per_round, warmup = (2, 1, 1) if args.quick else (6, 2, 2)
    modes = {"eager": [False], "compiled": [True], "both": [False, True]}[args.mode]
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    clock = time.perf_counter
    if args.clock == "cpu":
        torch.set_num_threads(1)
        clock = time.process_time
    print_machine()
    results = []
    rate_before = {p: matmul_flops_per_s(p, clock) for p in precisions}
    for name in args.models.split(","):
        for compile_ in modes:
            results += bench_model(name, compile_, precisions, rounds, per_round, warmup + 2 * compile_, clock)
    matmul = {p: max(rate_before[p], matmul_flops_per_s(p, clock)) for p in precisions}
    print_throughput(results, matmul)
    heldout = heldout_losses(precisions) if args.heldout else []
    if heldout:
        print_heldout(heldout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"throughput": results, "heldout": heldout}, f, indent=1)


if __name__ == "__main__":
    main()
