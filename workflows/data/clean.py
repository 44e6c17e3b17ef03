"""Cleaning: Gopher / C4 quality rules, language id, exact and MinHash-LSH dedup, held-out split."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator

from llm_lifecycle.workflows.data.dedup import CJK, exact_duplicates, is_cjk, near_duplicates, normalize_for_dedup
from llm_lifecycle.workflows.runner.settings import (
    AT_LEAST_1,
    BELOW_1,
    NON_NEGATIVE,
    ConfigError,
    Limit,
    Settings,
    setting,
)
from llm_lifecycle.workflows.runner.stage import (
    Progress,
    SilentProgress,
    atomic_path,
)
from llm_lifecycle.workflows.data.sources import unit_hash


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
class CleanConfig(Settings):
    """data-clean's settings (the stage kind owns them: workflows/stages/data_clean.py)."""

    min_chars: int = setting(50, "drop documents shorter than this", limit=NON_NEGATIVE)
    max_chars: int = setting(100_000, "drop documents longer than this", limit=NON_NEGATIVE)
    rules: bool | dict = setting(True, "Gopher/C4 quality rules: true, false, or a mapping of thresholds "
                                       "(e.g. {max_duplicate_line_fraction: 0.5})")
    exact_dedup: bool = setting(True, "drop exact duplicates (after normalisation)")
    minhash_dedup: bool = setting(True, "drop near-duplicates (MinHash-LSH)")
    minhash_threshold: float = setting(0.8, "Jaccard similarity at which two documents are near-duplicates",
                                       limit=Limit(lambda v: 0 < v <= 1, "a number above 0 and at most 1"))
    minhash_num_perm: int = setting(128, "MinHash permutations", limit=AT_LEAST_1)
    holdout_fraction: float = setting(0.02, "share of documents held out for perplexity (chosen by content hash)",
                                      limit=BELOW_1)
    languages: list[str] = setting([], "keep only these languages (ISO 639-1, e.g. [en, zh]); []: no language id")
    engine: str = setting("local", "local: in this process; datatrove: its executors (workflows/data/clean_datatrove.py)",
                          choices=("local", "datatrove"))
    datatrove_tasks: int = setting(2, "parallel tasks for engine: datatrove", limit=AT_LEAST_1)

    def check(self, where: str, upstream: dict) -> None:
        if self.max_chars < self.min_chars:
            raise ConfigError(f"{where}.max_chars ({self.max_chars}) is below min_chars ({self.min_chars}); "
                              "no document could pass")
        if isinstance(self.rules, dict):
            rule_keys = {f.name for f in fields(QualityRules)}
            bad = sorted(set(self.rules) - rule_keys)
            if bad:
                raise ConfigError(f"{where}.rules.{bad[0]}: unknown rule; valid: {', '.join(sorted(rule_keys))}")
        from lingua import IsoCode639_1

        bad = [c for c in self.languages if not hasattr(IsoCode639_1, c.upper())]
        if bad:
            raise ConfigError(f"{where}.languages: '{bad[0]}' is not an ISO 639-1 code lingua knows (e.g. en, zh)")

    @property
    def quality_rules(self) -> QualityRules | None:
        """The rule thresholds, or None when the rule filters are off."""
        if isinstance(self.rules, dict):
            return QualityRules(**self.rules)
        return QualityRules() if self.rules else None

    @property
    def language_codes(self) -> list[str]:
        return [c.lower() for c in self.languages]


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
    rules = cfg.quality_rules
    return rule_failure(text, rules) if rules else None


def language_failures(texts: list[str], cfg: CleanConfig) -> list[str | None]:
    """Per text: None when its language is one of cfg.language_codes, else what was detected."""
    if not cfg.language_codes:
        return [None] * len(texts)
    candidates = list(dict.fromkeys([*cfg.language_codes, *LANGUAGE_CANDIDATES]))
    return [None if lang in cfg.language_codes else f"detected: {lang or 'unsure'}" for lang in detect_languages(texts, candidates)]


def filter_steps(cfg: CleanConfig) -> dict[str, StepReport]:
    """An empty report for every step `cfg` runs, in pipeline order."""
    names = ["min_chars", "max_chars", *(RULE_STEPS if cfg.quality_rules else ()), *(["language"] if cfg.language_codes else [])]
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
    if cfg.language_codes:
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


