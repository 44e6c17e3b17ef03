"""GPU figures in a few minutes: training MFU of a ~0.5B dense and a small MoE model in bf16 at
sequence 2048, and their generation tokens/s.

    python benches/gpu_mfu.py [--steps 20] [--batch 8] [--models dense,moe] [--json out.json]
    python benches/gpu_mfu.py --tiny                  # the same code on CPU at toy size (errors only)

Training runs our trainer's parts: the decoder with its fused head loss and grouped experts
(torch._grouped_mm on Hopper), bf16 autocast over fp32 master weights, the trainer's fused
AdamW and gradient clipping, FSDP2 (`fully_shard` per block, then the root) in a process
group of one, and torch.compile per block, the way torchtitan compiles. MFU = model FLOPs
per token (6N + attention, config.flops_per_token) x tokens/s over the GPU's dense bf16 peak
(workflows/engine/trainer.py GPU_PEAK_FLOPS). Generation: models/generate.py, weights in bf16,
batch 64, 64-token prompts, 128 new tokens, greedy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder
from llm_lifecycle.models.generate import generate
from llm_lifecycle.registry.hardware import hardware_profile
from llm_lifecycle.workflows.engine.trainer import TrainSettings, lm_loss, make_optimizer, peak_flops

# Qwen2.5-0.5B's shape (494M parameters), and a Qwen3-MoE-style model of 1.56B parameters with
# 0.50B active per token (32 experts, top-4, 16 layers).
CONFIGS = {
    "dense": ModelConfig(family="qwen2", vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
                         ffn_dim=4864, qkv_bias=True, tie_embeddings=True, rope_theta=1e6, max_seq_len=2048),
    "moe": ModelConfig(family="qwen3_moe", vocab_size=151936, dim=1024, n_layers=16, n_heads=16, n_kv_heads=4,
                       qk_norm=True, tie_embeddings=False, n_experts=32, n_experts_per_token=4, moe_ffn_dim=768,
                       norm_eps=1e-6, rope_theta=1e6, max_seq_len=2048),
}
# The same designs at toy size, to run every code path on a CPU in seconds.
TINY = {
    "dense": ModelConfig(family="qwen2", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                         qkv_bias=True, tie_embeddings=True, max_seq_len=64),
    "moe": ModelConfig(family="qwen3_moe", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       qk_norm=True, tie_embeddings=False, n_experts=4, n_experts_per_token=2, moe_ffn_dim=32,
                       max_seq_len=64),
}
def process_group_of_one(device: str) -> None:
    """FSDP2 needs a process group; one rank, in memory, no torchrun."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)


def sharded_model(cfg: ModelConfig, device: str, compile_: bool) -> Decoder:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Decoder(cfg).to(device)
    for block in model.layers:
        if compile_:
            block.compile()
        fully_shard(block)
    return fully_shard(model)


def train_tokens_per_s(cfg: ModelConfig, device: str, batch: int, seq: int, steps: int, warmup: int,
                       compile_: bool) -> float:
    model = sharded_model(cfg, device, compile_)
    settings = TrainSettings(batch_size=batch, seq_len=seq, lr=3e-4, precision="bf16", compile=compile_)
    params = [(n, p) for n, p in model.named_parameters()]
    optimizer = make_optimizer(params, settings, device)
    data = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    inputs, targets = data[:, :-1], data[:, 1:]
    times = []
    for step in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, _ = lm_loss(model, (inputs, targets))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return batch * seq / statistics.median(times)


def generation_tokens_per_s(cfg: ModelConfig, device: str, batch: int, prompt_len: int, new_tokens: int) -> float:
    torch.manual_seed(0)
    model = Decoder(cfg).to(device=device, dtype=torch.bfloat16).eval()
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    generate(model, prompts[:1], max_new_tokens=2)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=new_tokens)
    sync(device)
    return sum(len(row) for row in out) / (time.perf_counter() - t0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="dense,moe", help="comma-separated: dense, moe")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    parser.add_argument("--batch", type=int, default=8, help="training sequences per step")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on CPU: check the script runs")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.tiny:
        parser.error("no GPU here: run it on a GPU machine, or with --tiny to check the script on this CPU")
    configs = TINY if args.tiny else CONFIGS
    seq, steps, warmup = (32, 2, 1) if args.tiny else (args.seq, args.steps, 5)
    gen = (4, 8, 8) if args.tiny else (64, 64, 128)  # batch, prompt tokens, new tokens
    process_group_of_one(device)
    hw = hardware_profile()
    print(f"{hw.get('hw.gpu.0.name', hw['hw.cpu'])}; torch {torch.__version__}; CUDA {hw.get('hw.cuda', '-')}")
    peak = peak_flops(device)
    results = []
    print(f"| model | params (active) | train tok/s | MFU | peak memory GiB | generate tok/s (batch {gen[0]}) |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        cfg = configs[name]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        tps = train_tokens_per_s(cfg, device, args.batch if not args.tiny else 2, seq, steps, warmup,
                                 not args.no_compile)
        mfu = tps * cfg.flops_per_token(seq) / peak if peak else None
        memory = peak_memory_gb(device)
        gen_tps = generation_tokens_per_s(cfg, device, *gen)
        results.append({"model": name, "params_m": cfg.num_params() / 1e6, "active_params_m": cfg.active_params() / 1e6,
                        "train_tokens_per_s": tps, "mfu": mfu, "peak_memory_gb": memory,
                        "generate_tokens_per_s": gen_tps})
        print(f"| {name} | {cfg.num_params() / 1e6:.1f}M ({cfg.active_params() / 1e6:.1f}M) | {tps:.0f} | "
              f"{f'{mfu:.1%}' if mfu else 'n/a'} | {memory:.1f} | {gen_tps:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
