"""Data stages: fetch the recipe's sources into one document file, then clean it.

data-fetch reads `builtin:NAME`, local files and folders (txt, jsonl, jsonl.gz, parquet, csv
with a header) and
`hf://datasets/OWNER/NAME[/path]` into `documents.jsonl`, one line per document:
{"text", "source", "group", "repeat"}; `group` names the mixture group that training
schedules sample by (workflows/data/mixture.py). A source's mixture weight becomes each document's `repeat`
count (2.0 = twice, 0.5 = a deterministic half) rather than repeated lines, so that the
exact-dedup step of data-clean does not undo the up-sampling; data-clean writes the repeats.

data-clean follows the Gopher / C4 recipes (Rae et al. 2021; Raffel et al. 2020): length
bounds, rule-based quality filters (with CJK text measured in characters, not whitespace
words), exact dedup on normalised text, MinHash-LSH near-dedup, and a held-out split chosen
by content hash, for perplexity.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import math
import re
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

from llm_lifecycle.registry.tracking import metric_key, redact_text
from llm_lifecycle.workflows.refs import one_line, builtin_path, hub_snapshot
from llm_lifecycle.workflows.runner.stage import (
    Progress,
    SilentProgress,
    UserError,
)

DATA_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet", ".csv")
TXT_SPLITS = ("line", "paragraph", "file")
HF_PREFIX = "hf://datasets/"

# ---------------------------------------------------------------------------------------
# Sources


@dataclass
class Source:
    uri: str
    weight: float = 1.0  # mixture weight: the expected number of copies of each document
    text_field: str = "text"  # for jsonl and parquet
    limit: int | None = None  # at most this many documents (before weighting)
    split: str = "paragraph"  # for txt: one document per line, blank-line block, or file
    revision: str | None = None  # for hf://: branch, tag or commit
    allow_patterns: list[str] | None = None  # for hf://: which repository files to download
    group: str = "general"  # the mixture group pretrain's schedule samples by (e.g. knowledge, long)

    @classmethod
    def from_cfg(cls, item: Any, key: str) -> "Source":
        if isinstance(item, str):
            item = {"uri": item}
        if not isinstance(item, dict) or not isinstance(item.get("uri"), str):
            raise UserError(f"{key}: expected a mapping with a 'uri' string, got {item!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(item) - known)
        if unknown:
            raise UserError(f"{key}.{unknown[0]}: unknown setting; valid: {', '.join(sorted(known))}")
        source = cls(**item)
        weight = source.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0 or not math.isfinite(weight):
            raise UserError(f"{key}.weight: expected a number >= 0, got {weight!r}")
        if source.limit is not None and (
            isinstance(source.limit, bool) or not isinstance(source.limit, int) or source.limit < 1
        ):
            raise UserError(f"{key}.limit: expected a positive integer, got {source.limit!r}")
        if not isinstance(source.group, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", source.group):
            raise UserError(f"{key}.group: expected a name of letters, digits, '_' or '-', got {source.group!r}")
        if source.split not in TXT_SPLITS:
            raise UserError(f"{key}.split: expected one of {', '.join(TXT_SPLITS)}, got {source.split!r}")
        return source


def parse_sources(items: Any, where: str = "stages.data-fetch") -> list[Source]:
    """A data-fetch stage's `sources` list; `where` names the stage in error lines."""
    if not isinstance(items, list) or not items:
        raise UserError(f"{where}.sources: expected a non-empty list of sources, e.g. [{{uri: builtin:corpus}}]")
    return [Source.from_cfg(item, f"{where}.sources[{i}]") for i, item in enumerate(items)]


def is_data_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(DATA_SUFFIXES)


def data_files(path: Path) -> list[Path]:
    """The readable files of a file or folder, in path order; hidden entries are skipped."""
    if path.is_file():
        return [path] if is_data_file(path) else []
    found = (p for p in path.rglob("*") if not any(part.startswith(".") for part in p.relative_to(path).parts))
    return sorted((p for p in found if is_data_file(p)), key=lambda p: p.relative_to(path).as_posix())


def hf_snapshot(uri: str, revision: str | None, allow_patterns: list[str] | None, key: str) -> Path:
    """Download (or find in the local cache) a Hugging Face dataset repository; return the path."""
    if not uri.startswith(HF_PREFIX):
        raise UserError(
            f"{key}: '{uri}' is not supported; Hugging Face sources look like hf://datasets/OWNER/NAME[/path]"
        )
    owner, _, rest = uri[len(HF_PREFIX) :].partition("/")
    name, _, inner = rest.partition("/")
    name, _, uri_revision = name.partition("@")
    if not owner or not name:
        raise UserError(f"{key}: '{uri}' names no dataset; expected hf://datasets/OWNER/NAME[/path]")
    repo_id = f"{owner}/{name}"
    inner = inner.strip("/")
    patterns = allow_patterns or ([inner, f"{inner}/*"] if inner else None)
    local = hub_snapshot(repo_id, key, repo_type="dataset", revision=revision or uri_revision or None,
                         allow_patterns=patterns)
    path = Path(local) / inner
    if not path.exists():
        raise UserError(f"{key}: '{inner}' is not in the dataset hf://datasets/{repo_id}")
    return path


def resolve_source(source: Source, key: str) -> Path:
    """The local file or folder a source's URI stands for (downloading hf:// ones)."""
    uri = source.uri
    if uri.startswith("builtin:"):
        path = builtin_path(uri[len("builtin:") :], f"{key}.uri")
    elif uri.startswith("hf://"):
        path = hf_snapshot(uri, source.revision, source.allow_patterns, f"{key}.uri")
    elif "://" in uri and not uri.startswith("file://"):
        raise UserError(
            f"{key}.uri: unsupported URI '{uri}'; use builtin:NAME, a local path, or hf://datasets/OWNER/NAME"
        )
    else:
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.exists():
            raise UserError(f"{key}.uri: no such file or folder: {path}; fix the path in the recipe")
    if not data_files(path):
        raise UserError(f"{key}.uri: no {', '.join(DATA_SUFFIXES)} files at {path}")
    return path


# ---------------------------------------------------------------------------------------
# Reading documents


def split_text(text: str, split: str) -> Iterator[str]:
    if split == "file":
        pieces: Iterable[str] = [text]
    elif split == "line":
        pieces = text.splitlines()
    else:
        pieces = re.split(r"\n\s*\n", text)
    for piece in pieces:
        piece = piece.strip()
        if piece:
            yield piece


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{path}:{lineno}: not valid JSON ({err.msg}); each line must be one JSON object"
                ) from None
            except RecursionError:
                raise UserError(f"{path}:{lineno}: JSON nested too deeply to read; each line must be one "
                                "JSON object with a text field") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(
                    f"{path}:{lineno}: no field '{text_field}' (has: {keys}); set text_field for this source"
                )
            text = record[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: field '{text_field}' is {type(text).__name__}, not text")
            yield text


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if text_field not in names:
            raise UserError(f"{path}: no column '{text_field}' (has: {', '.join(names)}); set text_field for this source")
        for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise UserError(f"{path}: column '{text_field}' holds {type(text).__name__}, not text")
                yield text
    except (pyarrow.ArrowException, OSError) as err:  # empty, truncated or not Parquet at all
        raise UserError(f"{path}: not a readable Parquet file ({one_line(err)}); "
                        "re-download it or drop it from the sources") from None


# The csv module refuses fields over 128 KiB by default; a long document is no mistake, but a
# field this large is a file that is not CSV (an unclosed quote swallowing the rest).
CSV_FIELD_LIMIT = 64 << 20


def _csv_texts(path: Path, text_field: str) -> Iterator[str]:
    import csv

    csv.field_size_limit(CSV_FIELD_LIMIT)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        try:
            if text_field not in (reader.fieldnames or []):
                raise UserError(
                    f"{path}: no column '{text_field}' in the header (has: {', '.join(reader.fieldnames or [])}); "
                    "set text_field for this source"
                )
            for row in reader:
                if row[text_field]:
                    yield row[text_field]
        except csv.Error as err:
            raise UserError(f"{path}:{reader.line_num}: not readable as CSV ({err}); "
                            f"fields may hold up to {CSV_FIELD_LIMIT >> 20} MiB") from None


def read_texts(path: Path, text_field: str = "text", split: str = "paragraph") -> Iterator[str]:
    """The non-empty documents of one data file."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            texts: Iterable[str] = _parquet_texts(path, text_field)
        elif name.endswith((".jsonl", ".jsonl.gz")):
            texts = _jsonl_texts(path, text_field)
        elif name.endswith(".csv"):
            texts = _csv_texts(path, text_field)
        else:
            texts = split_text(path.read_text(encoding="utf-8"), split)
        for text in texts:
            text = text.strip()
            if text:
                yield text
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; convert it to UTF-8 or drop it from the sources") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # not gzip, or cut short
        raise UserError(f"{path}: not a readable gzip file ({one_line(err)}); "
                        "re-download it or drop it from the sources") from None


def unit_hash(key: str) -> float:
    """A deterministic number in [0, 1) for `key`."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def repeat_count(weight: float, key: str) -> int:
    """Copies of one document under a mixture weight: floor(weight), plus one more for a
    deterministic fraction (weight - floor) of the documents chosen by hashing `key`."""
    whole = math.floor(weight)
    return whole + (1 if unit_hash(key) < weight - whole else 0)


@dataclass
class SourceStats:
    uri: str
    path: Path
    docs: int = 0  # documents read
    chars: int = 0
    weighted_docs: int = 0  # documents after the mixture weight


def fetch_source(
    source: Source, path: Path, out: TextIO, seed: int = 0, progress: Progress | None = None
) -> SourceStats:
    """Append the documents of one resolved source to `out` as jsonl; return what was read."""
    progress = progress or SilentProgress()
    stats = SourceStats(source.uri, path)
    files = data_files(path)
    if source.allow_patterns:  # the hub cache may hold more files of the dataset than these
        files = [f for f in files if any(fnmatch.fnmatch(f.as_posix(), "*/" + p) for p in source.allow_patterns)]
    with progress.task(f"fetch {source.uri}") as task:
        for file in files:
            # The label travels with each document into the workspace's files and reports: redacted.
            label = redact_text(source.uri if file == path else f"{source.uri}/{file.relative_to(path).as_posix()}")
            for text in read_texts(file, source.text_field, source.split):
                if source.limit is not None and stats.docs >= source.limit:
                    return stats
                repeat = repeat_count(source.weight, f"{seed}:{source.uri}:{stats.docs}")
                stats.docs += 1
                stats.chars += len(text)
                task.advance(1)
                if repeat:
                    stats.weighted_docs += repeat
                    record = {"text": text, "source": label, "group": source.group, "repeat": repeat}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return stats


def metric_label(uri: str) -> str:
    """A source URI, redacted, as MLflow accepts it inside a metric name."""
    return metric_key(uri)[:180]


