"""Held-out perplexity against evaluation length for the context-extension methods, on a model
pretrained at a short context: none (RoPE extrapolating), linear (position interpolation),
NTK-aware, YaRN, LongRoPE (factors derived from YaRN's ramp: models/decoder.py
yarn_as_longrope) and Dual Chunk Attention; each training-free, then (all but DCA, which is
training-free by design) after the same short fine-tune at a longer length.

    llm pipeline llama-small --stages data-fetch,data-clean,tokenizer-train,tokenize,pretrain \
        --set pretrain.seq_len=128 --set pretrain.steps=200 --set pretrain.warmup_steps=20
    python benches/long_context_ppl.py --model LLM_HOME/llama-small/pretrain/FP/model \
        --tokens LLM_HOME/llama-small/tokenize/FP --trained-len 128

Every scaling uses one factor, the longest evaluation length / the trained length, as a
deployed config would (so linear interpolation also compresses the short lengths).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time

import torch

from llm_lifecycle.models.decoder import Decoder, yarn_as_longrope
from llm_lifecycle.models.load import load_model
from llm_lifecycle.workflows.data.shards import TokenShards

METHODS = ("none", "linear", "ntk", "yarn", "longrope", "dca")
TRAINING_FREE_ONLY = ("dca",)


def extended(model: Decoder, method: str, factor: float, trained: int, longest: int) -> Decoder:
    """The model's weights under `method`, allowed to run at `longest` tokens."""
    cfg = dataclasses.replace(model.cfg, max_seq_len=longest)
    original = {"factor": factor, "original_max_seq_len": trained}
    if method in ("linear", "ntk"):
        cfg = dataclasses.replace(cfg, rope_scaling={"type": method, "factor": factor})
    elif method == "yarn":
        cfg = dataclasses.replace(cfg, rope_scaling={"type": "yarn", **original})
    elif method == "longrope":
        cfg = dataclasses.replace(cfg, rope_scaling={"type": "longrope", **original,
                                                     **yarn_as_longrope(cfg, factor, trained)})
    elif method == "dca":  # the extend-context stage's default split: 3/4 chunk, the rest local window
        chunk = 3 * trained // 4
        cfg = dataclasses.replace(cfg, dca_chunk=chunk, dca_local_window=trained - chunk)
    out = Decoder(cfg).eval()
    out.load_state_dict(model.state_dict())
    return out


def finetune(model: Decoder, train: torch.Tensor, seq_len: int, steps: int, batch: int, lr: float, seed: int) -> None:
    """Next-token training on random windows of the training shards (AdamW, 10% warm-up,
    cosine to 0.1 lr, grad clip 1): the extend-context stage's objective, the same windows
    for every method."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)
    model.train()
    for step in range(steps):
        progress = (step - warmup) / max(1, steps - warmup)
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        starts = torch.randint(0, train.numel() - seq_len - 1, (batch,), generator=generator)
        window = torch.stack([train[s : s + seq_len + 1] for s in starts.tolist()])
        loss = model(window[:, :-1], targets=window[:, 1:]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()


@torch.no_grad()
def perplexities(model: Decoder, tokens: torch.Tensor, length: int, windows: int, trained: int) -> tuple[float, float]:
    """(perplexity over every position, over the positions past `trained` only) on `windows`
    non-overlapping windows: the second isolates what the extension changes."""
    total, past = [], []
    for w in range(windows):
        window = tokens[w * length : (w + 1) * length][None]
        logits = model(window[:, :-1]).logits[0].float()
        nll = torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="none")
        total.append(nll)
        past.append(nll[trained:])  # the predictions made at positions >= trained
    if length <= trained:
        return math.exp(torch.cat(total).mean().item()), math.nan
    return math.exp(torch.cat(total).mean().item()), math.exp(torch.cat(past).mean().item())


def cpu_name() -> str:
    """The CPU model and the instruction sets that decide matmul speed."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile")
    return f"{name} ({', '.join(f if f in flags else 'no ' + f for f in wanted)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="one of our model folders, pretrained at a short context")
    parser.add_argument("--tokens", required=True, help="a tokenize stage folder (train/ and heldout/ shards)")
    parser.add_argument("--trained-len", type=int, help="the length it was pretrained at (default: its max_seq_len)")
    parser.add_argument("--lengths", help="comma-separated (default: 1, 2, 4, 8 and 16 x the trained length)")
    parser.add_argument("--windows", type=int, default=4,
                        help="held-out windows per length (fewer when the text is short)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--finetune-steps", type=int, default=20, help="0: training-free rows only")
    parser.add_argument("--finetune-len", type=int, help="default: 4 x the trained length")
    parser.add_argument("--finetune-batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    methods = args.methods.split(",")
    base, _ = load_model(args.model)
    trained = args.trained_len or base.cfg.max_seq_len
    lengths = [int(v) for v in args.lengths.split(",")] if args.lengths else [trained * m for m in (1, 2, 4, 8, 16)]
    args.finetune_len = args.finetune_len or 4 * trained
    factor = max(lengths) / trained
    heldout = torch.as_tensor(TokenShards(f"{args.tokens}/heldout").tokens[:].astype("int64"))
    train = torch.as_tensor(TokenShards(f"{args.tokens}/train").tokens[:].astype("int64"))
    windows = {n: min(args.windows, heldout.numel() // n) for n in lengths}
    lengths = [n for n in lengths if windows[n] > 0]
    print(f"model {args.model}: trained at {trained} tokens; held-out {heldout.numel()} tokens; "
          f"windows per length {windows}; scaling factor {factor:g}; DCA chunk {3 * trained // 4}, "
          f"window {trained - 3 * trained // 4}; fine-tune {args.finetune_steps} steps x {args.finetune_batch} x "
          f"{args.finetune_len} tokens at lr {args.lr:g}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.1f}")
    start = time.perf_counter()
    rows = []
    print("| method | " + " | ".join(f"ppl @ {n} (past {trained})" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for tuned in (False, True) if args.finetune_steps else (False,):
        for method in methods:
            if tuned and method in TRAINING_FREE_ONLY:
                continue
            model = extended(base, method, factor, trained, max(max(lengths), args.finetune_len))
            if tuned:
                finetune(model, train, args.finetune_len, args.finetune_steps, args.finetune_batch, args.lr, args.seed)
            ppl = {n: perplexities(model, heldout, n, windows[n], trained) for n in lengths}
            label = f"{method}, {'fine-tuned at ' + str(args.finetune_len) if tuned else 'training-free'}"
            rows.append({"method": method, "fine_tuned": tuned, "ppl": ppl})
            print(f"| {label} | " + " | ".join(f"{a:.2f} ({b:.2f})" for a, b in ppl.values()) + " |", flush=True)
    print(f"{time.perf_counter() - start:.0f} s; load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
