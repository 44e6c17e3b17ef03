"""Near-duplicate detection on a corpus with planted duplicates: recall, precision, docs/s.

The corpus is built from the texts in DATA/corpus (--data DATA, ../shared/data by default:
English Wikipedia, C4, WikiText-2, Shakespeare, Chinese classics) cut into 1-3 KB documents.
Into it we plant, at random positions:
  - exact copies after normalisation (case and whitespace changed),
  - near-duplicates: copies with word (or, for Chinese, character) swaps, deletions and
    insertions, kept when their exact 5-gram Jaccard with the original is >= POSITIVE_J,
  - hard negatives: heavier edits, kept when their Jaccard is in [0.3, NEGATIVE_J]: similar
    documents that must NOT be removed.
A removal is correct when the removed document and the one it was matched to come from the
same planted group, or when their exact Jaccard is >= the threshold (duplicates that were
already in the source data). Recall counts the planted copies that were removed.

Contenders, all on the same shingles (word 5-grams, character 5-grams for Chinese):
  ours        llm-lifecycle's dedup step (exact dedup, then rensa MinHash-LSH + confirmation)
  datasketch  plain datasketch: MinHash(128).update_batch per document, MinHashLSH(0.8)
              query-then-insert (its default band choice, no confirmation)
  --libraries also times the same algorithm as ours on datasketch (MinHash.generator) and on
  datatrove's four-step MinHash pipeline (LocalPipelineExecutor), to pick the library.

    python benches/dedup.py [--docs 4500] [--libraries]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

from llm_lifecycle.workflows.data.dedup import (
    exact_duplicates,
    is_cjk,
    jaccard,
    near_duplicates,
    normalize_for_dedup,
    shingles,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # the default --data: beside the clone
THRESHOLD = 0.8
NUM_PERM = 128
POSITIVE_J = 0.85  # planted near-duplicates are at least this similar ...
NEGATIVE_J = 0.65  # ... and hard negatives at most this


# ---------------------------------------------------------------------------------------
# The corpus


def _chunks(units: list[str], sep: str, rng: random.Random) -> list[str]:
    """Join `units` into documents of 1-3 KB of UTF-8."""
    docs, current, size, target = [], [], 0, rng.randint(1000, 3000)
    for unit in units:
        current.append(unit)
        size += len(unit.encode("utf-8")) + len(sep)
        if size >= target:
            docs.append(sep.join(current))
            current, size, target = [], 0, rng.randint(1000, 3000)
    return docs


def base_documents(corpus: Path, rng: random.Random) -> list[str]:
    docs = []
    for line in (corpus / "en_wiki_demo.txt").read_text(encoding="utf-8").splitlines():
        docs += _chunks(line.split(), " ", rng)
    for line in (corpus / "en_c4_demo.jsonl").read_text(encoding="utf-8").splitlines():
        docs += _chunks(json.loads(line)["text"].split(), " ", rng)
    for name in ("en_wikitext2_valid_tokenized.txt", "en_wikitext2_test_tokenized.txt", "en_tinyshakespeare.txt"):
        docs += _chunks(re.split(r"\n\s*\n", (corpus / name).read_text(encoding="utf-8")), "\n\n", rng)
    poetry = re.split(r"\n\s*\n", (corpus / "zh_chinese_poetry_classics.txt").read_text(encoding="utf-8"))
    chinese = _chunks(poetry, "\n\n", rng)
    docs += rng.sample(chinese, k=min(len(chinese), len(docs) // 2))  # about a third Chinese
    return [d.strip() for d in docs if len(d.strip()) > 200]


def edit(text: str, edits: int, rng: random.Random) -> str:
    """`edits` random swaps, deletions and insertions of words (characters for Chinese)."""
    cjk = is_cjk(text)
    units = [c for c in text if not c.isspace()] if cjk else text.split()
    for _ in range(edits):
        i = rng.randrange(len(units) - 1)
        op = rng.choice(("swap", "delete", "insert"))
        if op == "swap":
            units[i], units[i + 1] = units[i + 1], units[i]
        elif op == "delete":
            del units[i]
        else:
            units.insert(i, units[rng.randrange(len(units))])
    return "".join(units) if cjk else " ".join(units)


def restyle(text: str, rng: random.Random) -> str:
    """The same text after normalisation: case and whitespace changed."""
    words = text.split(" ")
    return "  ".join(w.upper() if rng.random() < 0.3 else w for w in words) + "\n"


def build_corpus(corpus: Path, n_docs: int, seed: int = 0):
    """(documents, group id per document, kind per document) with planted duplicates."""
    rng = random.Random(seed)
    base = base_documents(corpus, rng)
    rng.shuffle(base)
    n_base = min(len(base), int(n_docs * 0.8))
    base = base[:n_base]
    docs = [(text, g, "original") for g, text in enumerate(base)]
    next_group = len(base)
    planted = {"exact": 0, "near": 0, "negative": 0}
    while len(docs) < n_docs:
        g = rng.randrange(n_base)
        source = base[g]
        kind = rng.choices(("exact", "near", "negative"), weights=(1, 3, 1))[0]
        units = len(source) if is_cjk(source) else len(source.split())
        if kind == "exact":
            docs.append((restyle(source, rng), g, "exact"))
        elif kind == "near":
            copy = edit(source, max(1, int(units * rng.uniform(0.002, 0.02))), rng)
            if jaccard(shingles(normalize_for_dedup(copy)), shingles(normalize_for_dedup(source))) < POSITIVE_J:
                continue
            docs.append((copy, g, "near"))
        else:
            copy = edit(source, max(1, int(units * rng.uniform(0.04, 0.15))), rng)
            j = jaccard(shingles(normalize_for_dedup(copy)), shingles(normalize_for_dedup(source)))
            if not 0.3 <= j <= NEGATIVE_J:
                continue
            docs.append((copy, next_group, "negative"))
            next_group += 1
        planted[kind] += 1
    # Plant the copies at random positions, then swap each original in front of its copies so
    # that "the first of a group is kept" names the original.
    rng.shuffle(docs)
    first: dict[int, int] = {}
    for i, (_, g, _) in enumerate(docs):
        first.setdefault(g, i)
    for i, (_, g, kind) in enumerate(docs):
        if kind == "original" and first[g] != i:
            docs[first[g]], docs[i] = docs[i], docs[first[g]]
    return [d[0] for d in docs], [d[1] for d in docs], [d[2] for d in docs], planted


# ---------------------------------------------------------------------------------------
# Contenders: each returns {removed index: index it duplicates}


def ours(texts: list[str]) -> dict[int, int]:
    """The data-clean step: exact dedup on normalised text, then MinHash-LSH on the rest."""
    normalized = [normalize_for_dedup(t) for t in texts]
    removed = exact_duplicates(normalized)
    rest = [i for i in range(len(texts)) if i not in removed]
    near = near_duplicates([normalized[i] for i in rest], THRESHOLD, NUM_PERM)
    removed.update({rest[i]: rest[j] for i, j in near.items()})
    return removed


def plain_datasketch(texts: list[str]) -> dict[int, int]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    removed = {}
    for i, text in enumerate(texts):
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch([s.encode("utf-8") for s in shingles(normalize_for_dedup(text))])
        found = lsh.query(m)
        if found:
            removed[i] = min(found)
        else:
            lsh.insert(i, m)
    return removed


def datasketch_confirmed(texts: list[str]) -> dict[int, int]:
    """Our algorithm (same band choice, confirmation) on datasketch instead of rensa."""
    from datasketch import MinHash, MinHashLSH

    from llm_lifecycle.workflows.data.dedup import lsh_bands

    b = lsh_bands(THRESHOLD, NUM_PERM)
    lsh = MinHashLSH(num_perm=NUM_PERM, params=(b, NUM_PERM // b))
    normalized = [normalize_for_dedup(t) for t in texts]
    removed = exact_duplicates(normalized)
    kept = {}
    features = ([s.encode("utf-8") for s in shingles(t)] for t in normalized)
    for i, m in enumerate(MinHash.generator(features, num_perm=NUM_PERM, seed=1)):
        if i in removed:
            continue
        match = next((j for j in sorted(lsh.query(m)) if kept[j].jaccard(m) >= THRESHOLD), None)
        if match is None:
            lsh.insert(i, m)
            kept[i] = m
        else:
            removed[i] = match
    return removed


def datatrove_pipeline(texts: list[str]) -> dict[int, int]:
    """datatrove's MinHash dedup (signatures, buckets, clusters, filter) on its local executor,
    with our shingling units as its word tokenizer. It reports removals, not their matches."""
    from datatrove.data import Document as DTDocument
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig
    from datatrove.utils.word_tokenizers import WhitespaceTokenizer

    from llm_lifecycle.workflows.data.dedup import lsh_bands

    class ShingleUnits(WhitespaceTokenizer):
        def word_tokenize(self, text):
            return list(text.replace(" ", "")) if is_cjk(text) else text.split()

    b = lsh_bands(THRESHOLD, NUM_PERM)
    config = MinhashConfig(
        n_grams=5, num_buckets=b, hashes_per_bucket=NUM_PERM // b,
        # its xxhash path fails on str in 0.10.1
        hash_config=HashConfig(precision=64, hash_fc="sha1"),
        norm_config=TextNormConfig(remove_punctuation=False, norm_numbers=False, norm_weekdays=False,
                                   norm_monthnames=False, norm_unicode_diacritics=False),
    )
    kept_ids: list[str] = []

    def read(data, rank=0, world_size=1):
        for i, t in enumerate(texts):
            yield DTDocument(text=t, id=str(i))

    def collect(data, rank=0, world_size=1):
        for doc in data:
            kept_ids.append(doc.id)
            yield doc

    from datatrove.utils.logging import logger

    logger.remove()  # its per-task log lines would bury the table
    with tempfile.TemporaryDirectory() as tmp:
        sigs, buckets, clusters = f"{tmp}/sigs", f"{tmp}/buckets", f"{tmp}/clusters"
        tokenizer = ShingleUnits()
        steps = [
            [read, MinhashDedupSignature(sigs, config=config, language=tokenizer)],
            [MinhashDedupBuckets(sigs, buckets, config=config)],
            [MinhashDedupCluster(buckets, clusters, config=config)],
            [read, MinhashDedupFilter(clusters), collect],
        ]
        for i, pipeline in enumerate(steps):
            tasks = b if i == 1 else 1  # the bucket step runs one task per band
            LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=f"{tmp}/logs{i}").run()
    kept = set(map(int, kept_ids))
    return {i: -1 for i in range(len(texts)) if i not in kept}


CONTENDERS = {"ours": ours, "datasketch": plain_datasketch}
LIBRARIES = {"datasketch+confirm": datasketch_confirmed, "datatrove": datatrove_pipeline}


# ---------------------------------------------------------------------------------------
# Scoring


def score(removed: dict[int, int], texts, groups, kinds) -> dict[str, float]:
    planted = {i for i, k in enumerate(kinds) if k in ("exact", "near")}
    cache: dict[int, list[str]] = {}

    def sh(i):
        if i not in cache:
            cache[i] = shingles(normalize_for_dedup(texts[i]))
        return cache[i]

    correct = 0
    for i, j in removed.items():
        if j < 0:  # the engine names no match: correct if a planted copy or a natural duplicate
            ok = i in planted or any(
                groups[k] == groups[i] for k in range(len(texts)) if k != i and k not in removed and kinds[i] != "negative"
            )
        else:
            ok = (groups[i] == groups[j]) or jaccard(sh(i), sh(j)) >= THRESHOLD
        correct += ok
    found = len(planted & set(removed))
    return {
        "removed": len(removed),
        "recall": found / len(planted),
        "precision": correct / len(removed) if removed else 1.0,
        "negatives_removed": sum(1 for i in removed if kinds[i] == "negative"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4500)
    parser.add_argument("--data", type=Path, default=SHARED_DATA,
                        help="the benchmark data folder (its corpus/ holds the source texts; not in the repository)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--libraries", action="store_true", help="also time datasketch+confirm and datatrove")
    args = parser.parse_args()

    texts, groups, kinds, planted = build_corpus(args.data / "corpus", args.docs, args.seed)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    zh = sum(map(is_cjk, texts))
    print(f"corpus: {len(texts)} documents, {mb:.1f} MB ({zh} Chinese); planted {planted}", flush=True)
    contenders = {**CONTENDERS, **(LIBRARIES if args.libraries else {})}
    rows = {}
    for name, fn in contenders.items():
        t0 = time.perf_counter()
        removed = fn(texts)
        seconds = time.perf_counter() - t0
        rows[name] = {"seconds": seconds, "docs_per_s": len(texts) / seconds, **score(removed, texts, groups, kinds)}
    base = rows["datasketch"]["docs_per_s"]
    print(f"\n| contender | recall | precision | hard negatives removed | seconds | docs/s | vs plain datasketch |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['recall']:.3f} | {r['precision']:.3f} | {r['negatives_removed']} of {planted['negative']} "
              f"| {r['seconds']:.2f} | {r['docs_per_s']:,.0f} | {r['docs_per_s'] / base:.1f}x |")
    ok = rows["ours"]["recall"] >= 0.95 and rows["ours"]["precision"] >= 0.98
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
