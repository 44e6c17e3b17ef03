"""Training throughput: our decoder + trainer step against Hugging Face transformers' model
of the same architecture and size, in the same process, eager and compiled.

    python benches/train_throughput.py [--quick] [--mode eager|compiled|both] [--models llama,moe]

One training step = forward, next-token cross-entropy, backward, gradient clipping and an
AdamW step, at batch 8 x 256 in fp32. Both sides get the same optimizer (fused AdamW where
torch has it), the same config and the same initial weights (ours converted to the HF
layout). Steps of ours and of the peer alternate in rounds so machine noise hits both; the
median step time is reported. The model FLOP/s (config FLOPs per token x tokens/s, MoE
counting active parameters) is put beside this machine's best 2048^3 fp32 matmul rate,
measured before and after in the same run.

The ceiling column bounds what any rewrite of our step could reach against this peer with
the same kernels: the peer's step time over the time our step spends inside matmul and
attention kernels alone (torch.profiler self time of one step), as if everything else
(norms, activations, RoPE, the loss, the optimizer) cost nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder
from llm_lifecycle.models.hf import ENDOFTEXT, hf_config, to_hf_state_dict
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


def matmul_flops_per_s(n: int = 2048, repeats: int = 10) -> float:
    """The best of `repeats` runs: the machine's rate (noise from other tenants only slows it)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
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


def make_step(model: torch.nn.Module, forward, compile_: bool):
    """A closure running one full training step on `batch`."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused_adamw_available("cpu") or None)
    run = maybe_compile(model, compile_)

    def step(batch):
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


def bench_pair(name: str, compile_: bool, rounds: int, steps_per_round: int, warmup: int) -> dict:
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    ours = Decoder(cfg)
    peer = hf_model(cfg, ours)
    sides = {"ours": make_step(ours, ours_forward, compile_), "hf": make_step(peer, hf_forward, compile_)}
    data = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    batch = (data[:, :-1].contiguous(), data[:, 1:].contiguous())
    for step in sides.values():  # compile and warm the allocator outside the timing
        for _ in range(warmup):
            step(batch)
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(rounds):
        for side, step in sides.items():
            for _ in range(steps_per_round):
                t0 = time.perf_counter()
                step(batch)
                times[side].append(time.perf_counter() - t0)
    tps = {side: BATCH * SEQ / statistics.median(t) for side, t in times.items()}
    ceiling = statistics.median(times["hf"]) / kernel_seconds(sides["ours"], batch)
    return {"model": name, "mode": "compiled" if compile_ else "eager", "params_m": cfg.num_params() / 1e6,
            "active_params_m": cfg.active_params() / 1e6, "ours_tokens_per_s": tps["ours"],
            "hf_tokens_per_s": tps["hf"], "ratio": tps["ours"] / tps["hf"], "ceiling": ceiling,
            "ours_model_flops_per_s": tps["ours"] * cfg.flops_per_token(SEQ)}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, noisier)")
    parser.add_argument("--mode", choices=("eager", "compiled", "both"), default="both")
    parser.add_argument("--models", default="llama,moe", help="comma-separated: llama, moe")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--profile", choices=tuple(CONFIGS), help="instead: torch.profiler table of our eager step")
    args = parser.parse_args()
    if args.profile:
        profile_ours(args.profile)
        return
    rounds, per_round, warmup = (2, 1, 1) if args.quick else (6, 2, 2)
    modes = {"eager": [False], "compiled": [True], "both": [False, True]}[args.mode]
    results = []
    rate_before = matmul_flops_per_s()
    for name in args.models.split(","):
        for compile_ in modes:
            results.append(bench_pair(name, compile_, rounds, per_round, warmup + 2 * compile_))
    matmul = max(rate_before, matmul_flops_per_s())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"best 2048^3 fp32 matmul: {matmul / 1e9:.1f} GFLOP/s")
    print("| model | params (active) | mode | ours tok/s | HF tok/s | ours / HF | ceiling | "
          "ours model FLOP/s / matmul |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        r["matmul_flops_per_s"] = matmul
        r["matmul_share"] = r["ours_model_flops_per_s"] / matmul
        print(f"| {r['model']} | {r['params_m']:.1f}M ({r['active_params_m']:.1f}M) | {r['mode']} | "
              f"{r['ours_tokens_per_s']:.0f} | {r['hf_tokens_per_s']:.0f} | {r['ratio']:.2f}x | "
              f"{r['ceiling']:.2f}x | {r['matmul_share']:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
