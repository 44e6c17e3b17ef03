"""data-clean on datatrove's executors, for more text than one machine holds.

Imported only when a recipe sets `engine: datatrove` (datatrove is an optional dependency).

The same steps as the in-process path, as a datatrove pipeline: our length, rule and
language filters as a datatrove filter, then datatrove's four-step MinHash deduplication
(signatures, LSH buckets, clusters, filter) on our shingles (normalised word 5-grams,
character 5-grams for Chinese) and band count. Exact duplicates after normalisation have
Jaccard 1 and go with the near-duplicates. Removed documents are written by exclusion
writers, which is where the per-step report's counts and examples come from.

Steps run on `LocalPipelineExecutor` here; the same pipeline lists run unchanged on
datatrove's `SlurmPipelineExecutor` or `RayPipelineExecutor` (their own settings: partition,
time, cluster address), with the folders on shared storage.
"""

from __future__ import annotations

import json
from pathlib import Path

from datatrove.data import Document as DTDocument
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.logging import logger
from datatrove.utils.word_tokenizers import WhitespaceTokenizer

from llm_lifecycle.workflows.data.clean import CleanConfig, CleanOutput, Document, filter_failure, filter_steps, language_failures, split_heldout
from llm_lifecycle.workflows.data.dedup import is_cjk, lsh_bands, normalize_for_dedup


class CleanFilter(BaseFilter):
    """Our length, quality-rule and language filters; the reason goes with each removal."""

    name = "llm-lifecycle filters"

    def __init__(self, cfg: CleanConfig, exclusion_writer=None):
        super().__init__(exclusion_writer, batch_size=256)
        self.cfg = cfg

    def filter(self, doc: DTDocument):
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[DTDocument]):
        reasons = [filter_failure(doc.text, self.cfg) for doc in batch]
        unsure = [i for i, r in enumerate(reasons) if r is None]
        for i, failure in zip(unsure, language_failures([batch[i].text for i in unsure], self.cfg)):
            if failure:
                reasons[i] = "language"
                batch[i].metadata["note"] = failure
        for doc, reason in zip(batch, reasons):
            if reason:
                doc.metadata["removed_by"] = reason
        return [True if r is None else (False, r) for r in reasons]


class ShingleUnits(WhitespaceTokenizer):
    """Our shingling units: normalised words, or characters for Chinese and Japanese."""

    def word_tokenize(self, text: str) -> list[str]:
        text = normalize_for_dedup(text)
        return list(text.replace(" ", "")) if is_cjk(text) else text.split()


def clean_with_datatrove(docs: list[Document], cfg: CleanConfig, work_dir: Path, tasks: int = 1) -> CleanOutput:
    """Filter and deduplicate `docs` with datatrove (in `tasks` parallel tasks), then split.
    Tasks finished by an interrupted earlier attempt in `work_dir` are not run again."""
    logger.remove()  # datatrove's per-task log lines would bury our progress
    inputs, filtered, deduped = work_dir / "input", work_dir / "filtered", work_dir / "deduped"
    removed = work_dir / "removed"
    _write_inputs(docs, inputs, tasks)
    bands = lsh_bands(cfg.minhash_threshold, cfg.minhash_num_perm)
    minhash = MinhashConfig(
        n_grams=5, num_buckets=bands, hashes_per_bucket=cfg.minhash_num_perm // bands,
        hash_config=HashConfig(precision=64, hash_fc="sha1"),  # its xxhash path fails on str in 0.10.1
    )

    def reader(folder: Path):
        return JsonlReader(str(folder), text_key="text", id_key="id", compression=None, glob_pattern="*.jsonl")

    def writer(folder: Path):
        return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None)

    runs = [
        ([reader(inputs), CleanFilter(cfg, exclusion_writer=writer(removed / "filters")), writer(filtered)], tasks),
    ]
    final = filtered
    if cfg.exact_dedup or cfg.minhash_dedup:
        sigs, buckets, clusters = work_dir / "signatures", work_dir / "buckets", work_dir / "clusters"
        runs += [
            ([reader(filtered), MinhashDedupSignature(str(sigs), config=minhash, language=ShingleUnits())], tasks),
            ([MinhashDedupBuckets(str(sigs), str(buckets), config=minhash)], bands),  # one task per band
            ([MinhashDedupCluster(str(buckets), str(clusters), config=minhash)], 1),
            ([reader(filtered), MinhashDedupFilter(str(clusters), exclusion_writer=writer(removed / "minhash")),
              writer(deduped)], tasks),
        ]
        final = deduped
    for i, (pipeline, n) in enumerate(runs):
        LocalPipelineExecutor(pipeline, tasks=n, workers=min(n, tasks), logging_dir=str(work_dir / f"logs{i}")).run()

    steps = filter_steps(cfg)
    for record in _read_records(removed / "filters"):
        steps[record["metadata"]["removed_by"]].add(_document(record), note=record["metadata"].get("note"))
    for record in _read_records(removed / "minhash"):
        steps["minhash_dedup" if cfg.minhash_dedup else "exact_dedup"].add(_document(record))
    survivors = sorted(_read_records(final), key=lambda r: int(r["id"]))
    return split_heldout([_document(r) for r in survivors], cfg, steps)


def _write_inputs(docs: list[Document], folder: Path, tasks: int) -> None:
    """The documents as `tasks` jsonl files (datatrove gives each task whole files)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [open(folder / f"{k:05d}.jsonl", "w", encoding="utf-8") for k in range(tasks)]
    try:
        for i, doc in enumerate(docs):
            record = {"id": str(i), "text": doc.text, "source": doc.source, "group": doc.group, "repeat": doc.repeat}
            files[i * tasks // max(1, len(docs))].write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        for f in files:
            f.close()


def _read_records(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        with open(path, encoding="utf-8") as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def _document(record: dict) -> Document:
    meta = record.get("metadata", {})
    return Document(record["text"], meta.get("source", ""), int(meta.get("repeat", 1)), meta.get("group", "general"))
