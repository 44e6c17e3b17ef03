"""Generation throughput: our generate (static KV cache, compiled one-token decode step)
against transformers' `generate` on the same exported model, in one run, and llama.cpp on
its GGUF export when llama-cpp-python is installed.

    python benches/generate_throughput.py [--quick] [--batches 1,64] [--prompts 64,512] [--clock cpu]

The model is the qwen3-small preset (tied embeddings, q/k-norm, GQA) with seeded random
weights drawn wide enough that its greedy choices are clear, saved as our model folder and
exported with `export_hf` (and `write_gguf`); transformers loads the export. Each case
generates exactly --new tokens per row (no stop token), greedy and sampled (temperature
1, no top-k/top-p), from random prompts; every row of a batch has the same prompt length.
Peers:

- ours eager and ours compiled (generate(..., compile=True));
- transformers' default generate (its dynamic cache, eager);
- transformers with cache_implementation="static" and its forward compiled
  (CompileConfig with _compile_all_devices, since it compiles only on GPUs by default);
- llama.cpp (llama-cpp-python, F32 GGUF) one sequence at a time: the binding decodes
  one sequence, so it appears in the batch-1 rows only. Its greedy tokens are compared
  with transformers' and the result reported (its kernels round differently).

Tokens/s = batch x new tokens / time of the whole call (prefill included), the best of
--rounds, the sides alternating within a round, after a warm-up call each that also pays
its compiles; wall time, or with --clock cpu process CPU time on one thread (for a loaded
machine: what each side computed, not what the others' jobs took from it). Greedy tokens
must equal transformers' default generate's (asserted). fp32 throughout.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

from llm_lifecycle.models.checkpoint import SPECIAL_TOKENS, save_model_dir
from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder
from llm_lifecycle.models.generate import generate
from llm_lifecycle.models.hf import export_hf
from llm_lifecycle.models.presets import load_preset


def synthetic_tokenizer(vocab_size: int):
    """Our byte-level BPE (what GGUF needs) trained on seeded random words: prompts are random
    ids anyway, so only the vocabulary size matters."""
    from llm_lifecycle.workflows.data.bpe import train_bpe

    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(20_000)]
    return train_bpe([" ".join(rng.choices(words, k=200)) for _ in range(2_000)], vocab_size=vocab_size)


def build_models(root: Path, max_len: int):
    """(ours, transformers' model of the export, the GGUF file or None)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cfg = ModelConfig.from_dict({**load_preset("qwen3-small"), "max_seq_len": max_len})
    torch.manual_seed(0)
    ours = Decoder(cfg).eval()
    with torch.no_grad():  # wide weights: clear argmax margins, so greedy runs compare exactly
        for name, param in ours.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.08)
    tokenizer = synthetic_tokenizer(cfg.vocab_size)
    assert tokenizer.get_vocab_size() == cfg.vocab_size
    save_model_dir(root / "ours", ours, tokenizer)
    export_hf(root / "ours", root / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf"), dtype=torch.float32).eval()
    return ours, theirs, _gguf(root, ours, tokenizer)


def _gguf(root: Path, ours: Decoder, tokenizer) -> Path | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    from llm_lifecycle.models.gguf import write_gguf

    path = root / "model.gguf"
    write_gguf(path, ours.cfg, ours.state_dict(), tokenizer, "f32")
    return path


def run_ours(model, prompts, new, sampled, compiled):
    return generate(model, prompts, new, temperature=1.0 if sampled else 0.0, seed=0, compile=compiled)


def run_hf(model, prompts, new, sampled, static):
    from transformers import CompileConfig

    ids = torch.tensor(prompts)
    kwargs = {}
    if static:
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers' own switch for compiling off GPUs
        kwargs.update(cache_implementation="static", compile_config=compile_config)
    if sampled:
        kwargs.update(do_sample=True, temperature=1.0, top_k=None, top_p=None)
    else:
        kwargs.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             eos_token_id=None, pad_token_id=0, **kwargs)
    return out[:, ids.size(1):].tolist()


def run_llama_cpp(llm, prompts, new, sampled):
    outs = []
    for prompt in prompts:
        llm.reset()
        tokens = llm.generate(prompt, top_k=0 if sampled else 1, top_p=1.0, min_p=0.0, temp=1.0 if sampled else 0.0,
                              repeat_penalty=1.0)
        outs.append([int(t) for _, t in zip(range(new), tokens)])
    return outs


def best_times(runs: dict, rounds: int, clock) -> tuple[dict[str, float], dict[str, list[list[int]]]]:
    """Each side's best time over `rounds`, the sides alternating within each round (so a
    change in the machine's load falls on all of them), after a warm-up call each that also
    pays its compiles; and each side's last outputs."""
    outs = {name: fn() for name, fn in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = clock()
            outs[name] = fn()
            times[name].append(clock() - t0)
    return {name: min(t) for name, t in times.items()}, outs


def profile_sides(ours, theirs, batch: int, length: int, new: int) -> None:
    """torch.profiler's top 12 operators by self time of one greedy call of each side,
    after a warm-up call: where each spends its time besides the shared kernels."""
    from torch.profiler import ProfilerActivity, profile

    prompts = torch.randint(len(SPECIAL_TOKENS), ours.cfg.vocab_size, (batch, length)).tolist()
    sides = {"ours eager": lambda: run_ours(ours, prompts, new, False, False),
             "ours compiled": lambda: run_ours(ours, prompts, new, False, True),
             "HF default": lambda: run_hf(theirs, prompts, new, False, False)}
    for name, fn in sides.items():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops)
        print(f"## {name}: batch {batch}, prompt {length}, {new} new tokens, greedy: {total / 1e6:.2f} s self CPU")
        for e in ops[:12]:
            print(f"{e.self_cpu_time_total / total:6.1%} {e.self_cpu_time_total / 1e6:7.3f} s {e.count:6d} x {e.key}")
        sys.stdout.flush()


def cpu_description() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model} ({', '.join(isa) or 'no AVX2/AVX-512/AMX'}), {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: batch 1, prompt 8, 8 new tokens, 1 round")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--prompts", default="64,512")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch (and llama.cpp) threads; default torch's")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: one thread, calls timed in process CPU seconds (for a machine others are loading)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--profile", action="store_true",
                        help="instead: torch.profiler tables of ours (eager, compiled) and HF default at the first "
                             "--batches and --prompts value")
    args = parser.parse_args()
    clock = time.perf_counter
    if args.clock == "cpu":
        args.threads, clock = 1, time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, lengths = [int(b) for b in args.batches.split(",")], [int(n) for n in args.prompts.split(",")]
    if args.quick:
        batches, lengths, args.new, args.rounds = [1], [8], 8, 1
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        # llama.cpp rounds its context up to a multiple of 256 and warns when that passes the model's
        max_len = -(-(max(lengths) + args.new) // 256) * 256
        ours, theirs, gguf = build_models(Path(tmp), max_len)
        if args.profile:
            profile_sides(ours, theirs, batches[0], lengths[0], args.new)
            return
        llm = None
        if gguf is not None:
            from llama_cpp import Llama

            llm = Llama(str(gguf), n_ctx=max_len, n_threads=torch.get_num_threads(),
                        logits_all=False, verbose=False)
        print(f"# {cpu_description()}; torch {torch.__version__}; qwen3-small "
              f"({ours.cfg.num_params() / 1e6:.1f}M params), {args.new} new tokens, fp32")
        print("| batch | prompt | mode | ours eager | ours compiled | HF default | HF static+compile | llama.cpp "
              "| compiled / HF default | compiled / HF static |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for batch in batches:
            for length in lengths:
                prompts = torch.randint(len(SPECIAL_TOKENS), ours.cfg.vocab_size, (batch, length)).tolist()
                for sampled in (False, True):
                    runs = {
                        "ours eager": lambda: run_ours(ours, prompts, args.new, sampled, False),
                        "ours compiled": lambda: run_ours(ours, prompts, args.new, sampled, True),
                        "HF default": lambda: run_hf(theirs, prompts, args.new, sampled, False),
                        "HF static+compile": lambda: run_hf(theirs, prompts, args.new, sampled, True),
                    }
                    if llm is not None and batch == 1:
                        runs["llama.cpp"] = lambda: run_llama_cpp(llm, prompts, args.new, sampled)
                    row = {"batch": batch, "prompt": length, "mode": "sampled" if sampled else "greedy"}
                    seconds, outs = best_times(runs, args.rounds, clock)
                    row.update({name: batch * args.new / s for name, s in seconds.items()})
                    if not sampled:
                        for name in ("ours eager", "ours compiled", "HF static+compile"):
                            assert outs[name] == outs["HF default"], f"{name}: greedy tokens differ from transformers'"
                        if "llama.cpp" in outs:  # other kernels, other rounding: reported, not asserted
                            row["llama.cpp same greedy tokens"] = outs["llama.cpp"] == outs["HF default"]
                    results.append(row)
                    cells = [f"{row[n]:.0f}" if n in row else "-" for n in
                             ("ours eager", "ours compiled", "HF default", "HF static+compile", "llama.cpp")]
                    print(f"| {batch} | {length} | {row['mode']} | {' | '.join(cells)} | "
                          f"{row['ours compiled'] / row['HF default']:.2f}x | "
                          f"{row['ours compiled'] / row['HF static+compile']:.2f}x |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
