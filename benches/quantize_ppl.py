"""Perplexity and size of weight-only quantization (RTN, GPTQ, AWQ at 8 and 4 bits) on a
trained model, the way the quantize stage measures them: calibration on training windows,
perplexity on the held-out shards.

    python benches/quantize_ppl.py --model LLM_HOME/llama-small/pretrain/FP/model \
        --tokens LLM_HOME/llama-small/tokenize/FP --methods rtn:8,rtn:4,gptq:4,awq:4
"""

from __future__ import annotations

import argparse
import time

import torch

from llm_lifecycle.evals.perplexity import perplexity
from llm_lifecycle.models.load import load_model
from llm_lifecycle.models.quantize import QuantConfig, quantize_model, state_dict_bytes
from llm_lifecycle.workflows.stages.quantize import calibration_batches
from llm_lifecycle.workflows.data.shards import TokenShards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="one of our model folders (full precision)")
    parser.add_argument("--tokens", required=True, help="a tokenize stage folder (train/ and heldout/ shards)")
    parser.add_argument("--methods", default="rtn:8,rtn:4,gptq:4,awq:4")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    heldout = torch.as_tensor(TokenShards(f"{args.tokens}/heldout").tokens[: args.seq_len * args.eval_windows].astype("int64"))
    train = TokenShards(f"{args.tokens}/train").tokens
    calibration = calibration_batches(train, args.seq_len, args.calib_windows, args.seed)
    model, _ = load_model(args.model)
    size = state_dict_bytes(model)
    ppl = perplexity(model, heldout, args.seq_len)
    print(f"model {args.model}: {size / 2**20:.2f} MiB, held-out ppl {ppl:.3f} "
          f"({heldout.numel() // args.seq_len} windows of {args.seq_len})")
    print("| method | bits | group | size MiB | size ratio | ppl | ppl change | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    for item in args.methods.split(","):
        method, bits = item.split(":")
        quantized, _ = load_model(args.model)
        start = time.perf_counter()
        quantize_model(quantized, QuantConfig(method, int(bits), args.group_size), calibration)
        seconds = time.perf_counter() - start
        q_size, q_ppl = state_dict_bytes(quantized), perplexity(quantized, heldout, args.seq_len)
        print(f"| {method} | {bits} | {args.group_size} | {q_size / 2**20:.2f} | {size / q_size:.2f}x | "
              f"{q_ppl:.3f} | {100 * (q_ppl - ppl) / ppl:+.2f}% | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
