"""The KV cache of multi-head latent attention, measured: deepseek-v2-small generating
greedily after a 4k-token prompt.

    python benches/mla_cache_memory.py [--context 4096] [--new 16] [--json out.json] [--baseline old.json]

Runs the decoder's own cache loop (prefill, then one token at a time through
`Decoder.new_kv_cache()`, the API every version has) and reports the bytes the cache's
tensors hold (each storage once, views counted at their full base), the peak memory torch
allocated during the decode steps beyond the weights (MemTracker), and the
`llm plan` estimate. With --baseline (the --json of a run of an older checkout, e.g. before
the latent cache) it asserts the same greedy tokens and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder
from llm_lifecycle.models.presets import load_preset
from llm_lifecycle.workflows.engine.memory import inference_memory
from llm_lifecycle.workflows.runner.planning import shape_of


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a view keeps its whole base alive)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


@torch.no_grad()
def measure(context: int, new: int) -> dict:
    from torch.distributed._tools.mem_tracker import MemTracker

    cfg = ModelConfig.from_dict(load_preset("deepseek-v2-small"))
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    with torch.no_grad():  # wide weights: clear argmax margins, so greedy runs compare exactly
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.08)
    prompt = torch.randint(0, cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(1))
    cache = model.new_kv_cache()
    logits = model(prompt, kv_cache=cache).logits[:, -1].clone()  # not a view holding every position's logits
    tokens = []
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        for _ in range(new):
            token = logits.argmax(-1)
            tokens.append(int(token))
            logits = model(token[:, None], kv_cache=cache).logits[:, -1]
            tracker.reset_mod_stats()  # per-module stats of this step; the peak is kept
    weights = sum(p.nbytes for p in model.parameters())
    decode_peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] - weights
    planned = inference_memory(shape_of(cfg), 1, context + new, "fp32")["kv_cache"]
    return {"context": context, "new": new, "tokens": tokens, "cache_bytes": held_bytes(cache.keys + cache.values),
            "decode_peak_bytes": decode_peak, "planned_kv_cache_bytes": planned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--json", help="write the measurement here")
    parser.add_argument("--baseline", help="a --json from another checkout to compare against")
    args = parser.parse_args()
    got = measure(args.context, args.new)
    mib = 2**20
    print(f"deepseek-v2-small, {args.context}-token prompt + {args.new} greedy tokens, fp32: cache holds "
          f"{got['cache_bytes'] / mib:.2f} MiB, decode-phase peak beyond weights {got['decode_peak_bytes'] / mib:.2f} MiB, "
          f"llm plan KV cache {got['planned_kv_cache_bytes'] / mib:.2f} MiB")
    if args.baseline:
        old = json.loads(Path(args.baseline).read_text())
        assert old["tokens"] == got["tokens"], "greedy tokens differ from the baseline's"
        print(f"baseline: cache {old['cache_bytes'] / mib:.2f} MiB, decode-phase peak {old['decode_peak_bytes'] / mib:.2f} MiB; "
              f"ratio cache {old['cache_bytes'] / got['cache_bytes']:.1f}x, "
              f"decode-phase peak {old['decode_peak_bytes'] / got['decode_peak_bytes']:.1f}x; same greedy tokens")
    if args.json:
        Path(args.json).write_text(json.dumps(got))


if __name__ == "__main__":
    main()
