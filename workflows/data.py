"""Data stages: fetch the recipe's sources into one document file, then clean it.

data-fetch reads `builtin:NAME`, local files and folders (txt, jsonl, jsonl.gz, parquet, csv
with a header) and
`hf://datasets/OWNER/NAME[/path]` into `documents.jsonl`, one line per document:
{"text", "source", "group", "repeat"}; `group` names the mixture group that training
schedules sample by (workflows/mixture.py). A source's mixture weight becomes each document's `repeat`
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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

from llm_lifecycle.registry.tracking import metric_key, redact_text
from llm_lifecycle.workflows.dedup import CJK, exact_duplicates, is_cjk, near_duplicates, normalize_for_dedup
from llm_lifecycle.workflows.stage import (
    Progress,
    SilentProgress,
    StageContext,
    StageResult,
    UserError,
    atomic_path,
    reject_unknown_settings,
    write_json_atomic,
)

BUILTIN_DIR = Path(__file__).parent / "builtin"
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


def parse_sources(cfg: dict) -> list[Source]:
    items = cfg.get("sources")
    if not isinstance(items, list) or not items:
        raise UserError("stages.data-fetch.sources: expected a non-empty list of sources, e.g. [{uri: builtin:corpus}]")
    return [Source.from_cfg(item, f"stages.data-fetch.sources[{i}]") for i, item in enumerate(items)]


def is_data_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(DATA_SUFFIXES)


def data_files(path: Path) -> list[Path]:
    """The readable files of a file or folder, in path order; hidden entries are skipped."""
    if path.is_file():
        return [path] if is_data_file(path) else []
    found = (p for p in path.rglob("*") if not any(part.startswith(".") for part in p.relative_to(path).parts))
    return sorted((p for p in found if is_data_file(p)), key=lambda p: p.relative_to(path).as_posix())


def list_builtin() -> list[str]:
    """Every `builtin:` name: the shipped folders and the data files in them (not their
    licence texts and provenance notes)."""
    names = []
    for path in sorted(BUILTIN_DIR.rglob("*")):
        relative = path.relative_to(BUILTIN_DIR)
        if not ("licenses" in relative.parts or path.suffix == ".md" or path.name.startswith((".", "__"))):
            names.append(relative.as_posix())
    return names


def builtin_path(name: str, key: str) -> Path:
    path = (BUILTIN_DIR / name).resolve()
    if not name or not path.is_relative_to(BUILTIN_DIR.resolve()) or not path.exists():
        known = ", ".join(f"builtin:{n}" for n in list_builtin())
        raise UserError(f"{key}: unknown built-in data 'builtin:{name}'; shipped: {known}")
    return path


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 240 else text[:237] + "..."


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
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        local = snapshot_download(
            repo_id=repo_id, repo_type="dataset", revision=revision or uri_revision or None, allow_patterns=patterns
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise UserError(
            f"{key}: Hugging Face dataset hf://datasets/{repo_id} not found ({_one_line(err)}); "
            "check the name and revision, or log in (`hf auth login`) for a gated or private dataset"
        ) from None
    except Exception as err:  # offline, DNS, HTTP, cache: all mean "no data from the hub"
        raise UserError(
            f"cannot reach the Hugging Face hub to fetch hf://datasets/{repo_id}: {_one_line(err)}; "
            "use a local path or builtin:NAME, or set HF_HUB_OFFLINE=0 with network"
        ) from None
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
    import pyarrow.parquet as pq

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


def _csv_texts(path: Path, text_field: str) -> Iterator[str]:
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if text_field not in (reader.fieldnames or []):
            raise UserError(
                f"{path}: no column '{text_field}' in the header (has: {', '.join(reader.fieldnames or [])}); "
                "set text_field for this source"
            )
        for row in reader:
            if row[text_field]:
                yield row[text_field]


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


def fetch(ctx: StageContext, cfg: dict) -> StageResult:
    """Stage data-fetch: every source into one `documents.jsonl`."""
    sources = parse_sources(cfg)
    # Resolve every source before reading any, so a bad path fails in a second, not after a download.
    paths = [resolve_source(s, f"stages.data-fetch.sources[{i}]") for i, s in enumerate(sources)]
    out = ctx.stage_dir / "documents.jsonl"
    all_stats = []
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for source, path in zip(sources, paths):
            ctx.tracker.log_input(path, name=source.uri, context="data-fetch")
            all_stats.append(fetch_source(source, path, f, seed=ctx.seed, progress=ctx.progress))
    metrics: dict[str, float] = {}
    for s in all_stats:
        label = metric_label(s.uri)
        for name, value in (("docs", s.docs), ("chars", s.chars), ("weighted_docs", s.weighted_docs)):
            metrics[f"fetch.{label}.{name}"] = metrics.get(f"fetch.{label}.{name}", 0) + value
        ctx.progress.log(f"  {s.uri}: {s.docs} documents, {s.chars:,} characters")
    for name in ("docs", "chars", "weighted_docs"):
        metrics[f"fetch.{name}"] = sum(getattr(s, name) for s in all_stats)
    if metrics["fetch.weighted_docs"] == 0:
        raise UserError("data-fetch read no documents; check stages.data-fetch.sources (paths, text_field, weight)")
    return StageResult(outputs={"documents": str(out)}, metrics=metrics)


# ---------------------------------------------------------------------------------------
# Cleaning

def word_count(text: str) -> int:
    """Words, counting each CJK character as one (their scripts put no spaces between words)."""
    return len(CJK.findall(text)) + len(CJK.sub(" ", text).split())


@dataclass
class QualityRules:
    """Gopher's rule filters (Rae et al. 2021, appendix A), thresholds as published."""

    min_mean_word_length: float = 3.0  # space-separated scripts only
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' and ellipses per word
    max_ellipsis_line_fraction: float = 0.3
    max_duplicate_line_fraction: float = 0.3
    # Off unless set (None), as they remove verse and lists the default corpus keeps; the
    # papers' values are in the comments.
    min_alpha_word_fraction: float | None = None  # Gopher 0.8: words with a letter (space-separated scripts)
    min_stop_words: int | None = None  # Gopher 2: of the, be, to, of, and, that, have, with (English)
    max_bullet_line_fraction: float | None = None  # Gopher 0.9: lines starting with a bullet
    c4_bad_content: bool = False  # C4: drop documents with "lorem ipsum" or a curly brace


def rule_failure(text: str, rules: QualityRules) -> str | None:
    """The name of the first rule `text` fails, or None."""
    words = max(1, word_count(text))
    if not is_cjk(text):
        plain_words = text.split()
        mean_length = sum(len(w) for w in plain_words) / len(plain_words)
        if not rules.min_mean_word_length <= mean_length <= rules.max_mean_word_length:
            return "mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / words > rules.max_symbol_word_ratio:
        return "symbol_ratio"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if sum(line.endswith(("...", "…")) for line in lines) / len(lines) > rules.max_ellipsis_line_fraction:
        return "ellipsis_lines"
    if (len(lines) - len(set(lines))) / len(lines) > rules.max_duplicate_line_fraction:
        return "duplicate_lines"
    if not is_cjk(text):
        lowered = text.lower().split()
        if rules.min_alpha_word_fraction is not None and (
            sum(any(c.isalpha() for c in w) for w in lowered) / len(lowered) < rules.min_alpha_word_fraction
        ):
            return "alpha_words"
        if rules.min_stop_words is not None and sum(w in STOP_WORDS for w in lowered) < rules.min_stop_words:
            return "stop_words"
    if rules.max_bullet_line_fraction is not None and (
        sum(line.startswith(BULLETS) for line in lines) / len(lines) > rules.max_bullet_line_fraction
    ):
        return "bullet_lines"
    if rules.c4_bad_content and ("lorem ipsum" in text.lower() or "{" in text):
        return "c4_bad_content"
    return None


STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "*", "-", "–")
RULE_STEPS = (
    "mean_word_length", "symbol_ratio", "ellipsis_lines", "duplicate_lines",
    "alpha_words", "stop_words", "bullet_lines", "c4_bad_content",
)
LANGUAGE_CANDIDATES = ("en", "zh", "ja", "ko", "fr", "de", "es", "pt", "it", "ru", "ar", "hi")


def detect_languages(texts: list[str], candidates: list[str], prefix_chars: int = 1000) -> list[str | None]:
    """ISO 639-1 code of each text's language (None when unsure), from the first
    `prefix_chars` characters, with lingua (offline n-gram models, no download at run time)
    in its low-accuracy mode over the candidate languages: ~250 documents/s on one busy core."""
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    languages = [Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper())) for code in candidates]
    detector = LanguageDetectorBuilder.from_languages(*languages).with_low_accuracy_mode().build()
    found = detector.detect_languages_in_parallel_of([t[:prefix_chars] for t in texts])
    return [lang.iso_code_639_1.name.lower() if lang is not None else None for lang in found]


@dataclass
class CleanConfig:
    min_chars: int = 50
    max_chars: int = 100_000
    rules: QualityRules | None = field(default_factory=QualityRules)  # None: no rule filters
    exact_dedup: bool = True
    minhash_dedup: bool = True
    minhash_threshold: float = 0.8
    minhash_num_perm: int = 128
    holdout_fraction: float = 0.02
    languages: list[str] = field(default_factory=list)  # keep only these (ISO 639-1); []: no language id
    engine: str = "local"  # local: in this process; datatrove: its executors (workflows/clean_datatrove.py)
    datatrove_tasks: int = 2  # parallel tasks for engine: datatrove

    @classmethod
    def from_cfg(cls, cfg: dict) -> "CleanConfig":
        reject_unknown_settings("stages.data-clean", cfg, {f.name for f in fields(cls)})
        values = dict(cfg)
        rules = values.pop("rules", True)
        if isinstance(rules, dict):  # thresholds given: {max_duplicate_line_fraction: 0.5, ...}
            rule_keys = {f.name for f in fields(QualityRules)}
            bad = sorted(set(rules) - rule_keys)
            if bad:
                raise UserError(
                    f"stages.data-clean.rules.{bad[0]}: unknown rule; valid: {', '.join(sorted(rule_keys))}"
                )
            values["rules"] = QualityRules(**rules)
        else:
            values["rules"] = QualityRules() if rules else None
        config = cls(**values)
        from lingua import IsoCode639_1

        bad = [c for c in config.languages if not isinstance(c, str) or not hasattr(IsoCode639_1, c.upper())]
        if bad:
            raise UserError(f"stages.data-clean.languages: '{bad[0]}' is not an ISO 639-1 code lingua knows (e.g. en, zh)")
        config.languages = [c.lower() for c in config.languages]
        if config.engine not in ("local", "datatrove"):
            raise UserError(f"stages.data-clean.engine: expected local or datatrove, got {config.engine!r}")
        if not 0 <= config.holdout_fraction < 1:
            raise UserError(
                f"stages.data-clean.holdout_fraction: expected a number in [0, 1), got {config.holdout_fraction}"
            )
        if not 0 < config.minhash_threshold <= 1:
            raise UserError(
                f"stages.data-clean.minhash_threshold: expected a number in (0, 1], got {config.minhash_threshold}"
            )
        return config


@dataclass
class Document:
    text: str
    source: str
    repeat: int = 1
    group: str = "general"


@dataclass
class StepReport:
    removed: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)

    def add(
        self, doc: Document, duplicate_of: Document | None = None, note: str | None = None, keep_examples: int = 3
    ) -> None:
        self.removed += 1
        if len(self.examples) < keep_examples:
            example = {"source": doc.source, "text": _shorten(doc.text)}
            if duplicate_of is not None:
                example["duplicate_of"] = _shorten(duplicate_of.text)
            if note is not None:
                example["note"] = note
            self.examples.append(example)


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _drop(docs: list[Document], normalized: list[str], duplicates: dict[int, int], report: StepReport):
    """`docs` and `normalized` without the `duplicates`, each added to `report`."""
    for i, j in duplicates.items():
        report.add(docs[i], duplicate_of=docs[j])
    keep = [i for i in range(len(docs)) if i not in duplicates]
    return [docs[i] for i in keep], [normalized[i] for i in keep]


@dataclass
class CleanOutput:
    train: list[Document]
    heldout: list[Document]
    steps: dict[str, StepReport]


def filter_failure(text: str, cfg: CleanConfig) -> str | None:
    """The name of the first length or quality rule `text` fails, or None."""
    if len(text) < cfg.min_chars:
        return "min_chars"
    if len(text) > cfg.max_chars:
        return "max_chars"
    return rule_failure(text, cfg.rules) if cfg.rules else None


def language_failures(texts: list[str], cfg: CleanConfig) -> list[str | None]:
    """Per text: None when its language is one of cfg.languages, else what was detected."""
    if not cfg.languages:
        return [None] * len(texts)
    candidates = list(dict.fromkeys([*cfg.languages, *LANGUAGE_CANDIDATES]))
    return [None if lang in cfg.languages else f"detected: {lang or 'unsure'}" for lang in detect_languages(texts, candidates)]


def filter_steps(cfg: CleanConfig) -> dict[str, StepReport]:
    """An empty report for every step `cfg` runs, in pipeline order."""
    names = ["min_chars", "max_chars", *(RULE_STEPS if cfg.rules else ()), *(["language"] if cfg.languages else [])]
    names += [name for name, on in (("exact_dedup", cfg.exact_dedup), ("minhash_dedup", cfg.minhash_dedup)) if on]
    return {name: StepReport() for name in names}


def clean_documents(docs: list[Document], cfg: CleanConfig, progress: Progress | None = None) -> CleanOutput:
    """Filter, deduplicate and split `docs` in this process (in order; the first of duplicates is kept)."""
    progress = progress or SilentProgress()
    steps = filter_steps(cfg)
    survivors = []
    with progress.task("filter", total=len(docs)) as task:
        for doc in docs:
            failed = filter_failure(doc.text, cfg)
            if failed:
                steps[failed].add(doc)
            else:
                survivors.append(doc)
            task.advance(1)
    if cfg.languages:
        with progress.task("language id (lingua)", total=len(survivors)) as task:
            failures = language_failures([d.text for d in survivors], cfg)
            task.advance(len(survivors))
        for doc, failure in zip(survivors, failures):
            if failure:
                steps["language"].add(doc, note=failure)
        survivors = [doc for doc, failure in zip(survivors, failures) if not failure]
    normalized = [normalize_for_dedup(d.text) for d in survivors]
    if cfg.exact_dedup:
        survivors, normalized = _drop(survivors, normalized, exact_duplicates(normalized), steps["exact_dedup"])
    if cfg.minhash_dedup:
        duplicates = near_duplicates(normalized, cfg.minhash_threshold, cfg.minhash_num_perm, progress=progress)
        survivors, normalized = _drop(survivors, normalized, duplicates, steps["minhash_dedup"])
    return split_heldout(survivors, cfg, steps)


def split_heldout(survivors: list[Document], cfg: CleanConfig, steps: dict[str, StepReport]) -> CleanOutput:
    """Held-out documents are chosen by a hash of their content, so the split is the same
    whatever order or company they arrive in; dedup ran first, so no copy of a held-out
    document stays in training."""
    draws = [unit_hash("heldout:" + normalize_for_dedup(d.text)) for d in survivors]
    heldout_ids = {i for i, u in enumerate(draws) if u < cfg.holdout_fraction}
    if cfg.holdout_fraction > 0 and not heldout_ids and len(survivors) > 1:
        heldout_ids = {min(range(len(draws)), key=draws.__getitem__)}  # tiny corpora still get one
    train = [d for i, d in enumerate(survivors) if i not in heldout_ids]
    heldout = [d for i, d in enumerate(survivors) if i in heldout_ids]
    return CleanOutput(train=train, heldout=heldout, steps=steps)


def read_documents(path: str | Path) -> list[Document]:
    with open(path, encoding="utf-8") as f:
        return [
            Document(r["text"], r.get("source", ""), int(r.get("repeat", 1)), r.get("group", "general"))
            for r in map(json.loads, f)
        ]


def iter_texts(path: str | Path) -> Iterator[str]:
    """The `text` of every line of a documents jsonl file (clean.jsonl, heldout.jsonl)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def iter_groups(path: str | Path) -> Iterator[str]:
    """The mixture `group` of every line of a documents jsonl file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line).get("group", "general")


def write_documents(path: Path, docs: Iterable[Document], expand_repeats: bool) -> int:
    """Write {"text", "source", "group"} lines atomically; with `expand_repeats`, each `repeat` times."""
    lines = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            line = json.dumps({"text": doc.text, "source": doc.source, "group": doc.group}, ensure_ascii=False) + "\n"
            copies = doc.repeat if expand_repeats else 1
            f.write(line * copies)
            lines += copies
    return lines


def clean(ctx: StageContext, cfg: dict) -> StageResult:
    """Stage data-clean: `clean.jsonl` (training, mixture repeats applied), `heldout.jsonl`, `report.json`."""
    config = CleanConfig.from_cfg(cfg)
    documents_path = ctx.upstream_output("data-fetch", "documents")
    ctx.tracker.log_input(documents_path, name="documents", context="data-clean")
    docs = read_documents(documents_path)
    if config.engine == "datatrove":
        try:
            from llm_lifecycle.workflows.clean_datatrove import clean_with_datatrove
        except ImportError:
            raise UserError(
                "stages.data-clean.engine: datatrove is not installed; `pip install datatrove` or use engine: local"
            ) from None
        with ctx.progress.task(f"clean on datatrove ({config.datatrove_tasks} tasks)"):
            result = clean_with_datatrove(docs, config, ctx.stage_dir / "datatrove", config.datatrove_tasks)
    else:
        result = clean_documents(docs, config, ctx.progress)
    if not result.train:
        raise UserError(
            f"data-clean removed all {len(docs)} documents; loosen stages.data-clean "
            "(min_chars, max_chars, rules, minhash_threshold) or add data"
        )
    clean_path, heldout_path = ctx.stage_dir / "clean.jsonl", ctx.stage_dir / "heldout.jsonl"
    train_lines = write_documents(clean_path, result.train, expand_repeats=True)
    write_documents(heldout_path, result.heldout, expand_repeats=False)
    report = {
        "input_documents": len(docs),
        "kept": len(result.train) + len(result.heldout),
        "train_documents": len(result.train),
        "train_lines": train_lines,
        "heldout_documents": len(result.heldout),
        "steps": {name: {"removed": s.removed, "examples": s.examples} for name, s in result.steps.items()},
    }
    report_path = ctx.stage_dir / "report.json"
    write_json_atomic(report_path, report)
    ctx.tracker.log_dict(report, "report.json")
    metrics = {
        "clean.input": len(docs),
        "clean.kept": report["kept"],
        "clean.train": len(result.train),
        "clean.train_lines": train_lines,
        "clean.heldout": len(result.heldout),
        "clean.train_chars": sum(len(d.text) * d.repeat for d in result.train),
        **{f"clean.removed.{name}": s.removed for name, s in result.steps.items()},
    }
    removed = ", ".join(f"{n} {s.removed}" for n, s in result.steps.items() if s.removed)
    kept = f"kept {report['kept']} of {len(docs)} documents ({len(result.heldout)} held out)"
    ctx.progress.log(f"  {kept}; removed: {removed or 'none'}")
    return StageResult(
        outputs={"clean": str(clean_path), "heldout": str(heldout_path), "report": str(report_path)},
        metrics=metrics,
    )
