"""Tokenize + pack throughput: our sharded encoder against bare `tokenizers` encode_batch.

The text is English (Wikipedia, C4, Shakespeare) and Chinese (classics) from DATA/corpus
(--data DATA, ../shared/data by default) written as a documents jsonl. A byte-level BPE
tokenizer (ours, vocabulary 8192) is trained on a sample of it. Then, best of --repeat runs each:

  bare         Tokenizer.encode_batch(all texts) on texts already in memory, with the
               tokenizer's own Rust threads on every core; nothing is written
  ours N=1, 2  workflows/data/encode.py encode_file + shards.write_parts: read the jsonl, parse,
               encode in N worker processes, pack into uint16 memory-mapped shards with the
               document index, write (worker start-up included)

Wall time is the must-show; CPU seconds (this process plus its workers) are printed beside
it because on a shared machine they show the work done even when the cores are busy.
The shards of N=1 and N=2 are checked to be byte-identical and to hold exactly the bare
encodings, each followed by end-of-text.

    python benches/tokenize_throughput.py [--mb 4] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Spawned workers re-import this script: keep its top-level imports light (no torch).
from llm_lifecycle.workflows.data.encode import encode_file

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # the default --data: beside the clone


def documents(corpus: Path, megabytes: float, seed: int = 0) -> list[str]:
    docs = [line for line in (corpus / "en_wiki_demo.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    docs += [json.loads(line)["text"] for line in (corpus / "en_c4_demo.jsonl").read_text(encoding="utf-8").splitlines()]
    docs += re.split(r"\n\s*\n", (corpus / "en_tinyshakespeare.txt").read_text(encoding="utf-8"))
    docs += re.split(r"\n\s*\n", (corpus / "zh_chinese_poetry_classics.txt").read_text(encoding="utf-8"))
    docs = [d.strip() for d in docs if d.strip()]
    random.Random(seed).shuffle(docs)
    out, size = [], 0
    for doc in docs:
        out.append(doc)
        size += len(doc.encode("utf-8"))
        if size >= megabytes * 1e6:
            break
    return out


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker processes)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def best_of(repeat: int, fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the fastest of `repeat` runs of `fn`."""
    runs = []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), cpu_seconds()
        fn()
        runs.append((time.perf_counter() - t0, cpu_seconds() - c0))
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="megabytes of text")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--data", type=Path, default=SHARED_DATA,
                        help="the benchmark data folder (its corpus/ holds the source texts; not in the repository)")
    args = parser.parse_args()
    from llm_lifecycle.workflows.data.shards import TokenShards, write_parts
    from llm_lifecycle.workflows.data.bpe import EOT, train_bpe

    texts = documents(args.data / "corpus", args.mb)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tokenizer = train_bpe(texts[::4], vocab_size=8192)
    eot = tokenizer.token_to_id(EOT)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "clean.jsonl"
        jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
        tokenizer_file = tmp / "tokenizer.json"  # the tokenize stage reads tokenizer-train's file too
        tokenizer.save(str(tokenizer_file))
        print(f"{len(texts)} documents, {mb:.2f} MB of UTF-8 text; vocabulary {tokenizer.get_vocab_size()}", flush=True)

        encodings = []
        rows = {"bare encode_batch (threads)": best_of(args.repeat, lambda: encodings.append(tokenizer.encode_batch(texts)))}
        expected = np.concatenate([np.asarray(e.ids + [eot]) for e in encodings[-1]])
        shards = {}
        for workers in (1, 2):
            out = tmp / f"shards{workers}"

            def run():
                for old in out.glob("*"):
                    old.unlink()  # time a fresh write, not a resume
                write_parts(out, encode_file(tokenizer_file, eot, jsonl, workers), tokenizer.get_vocab_size())

            rows[f"ours, {workers} process{'es' if workers > 1 else ''}"] = best_of(args.repeat, run)
            shards[workers] = TokenShards(out)
        np.testing.assert_array_equal(np.asarray(shards[1].tokens), expected)
        np.testing.assert_array_equal(np.asarray(shards[2].tokens), expected)
        assert [p.read_bytes() for p in sorted((tmp / "shards1").iterdir())] == [
            p.read_bytes() for p in sorted((tmp / "shards2").iterdir())
        ]
        print(f"{expected.size:,} tokens; shards identical for 1 and 2 processes and equal to the bare encodings\n")

    bare, bare_cpu = rows["bare encode_batch (threads)"]
    print("| run | wall s | MB/s | wall vs bare | CPU s | CPU vs bare |")
    print("|---|---|---|---|---|---|")
    for name, (seconds, cpu) in rows.items():
        print(f"| {name} | {seconds:.2f} | {mb / seconds:.2f} | {seconds / bare:.2f}x | {cpu:.2f} | {cpu / bare_cpu:.2f}x |")
    scaling = rows["ours, 1 process"][0] / rows["ours, 2 processes"][0]
    print(f"\nscaling 1 -> 2 processes (wall): {scaling:.2f}x")
    sys.exit(0 if rows["ours, 2 processes"][0] <= 1.3 * bare else 1)


if __name__ == "__main__":
    main()
