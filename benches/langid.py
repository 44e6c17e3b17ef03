"""Language id speed and accuracy: lingua as data-clean uses it (low-accuracy mode, 12
candidate languages, first 1,000 characters) against lingua's high-accuracy mode.

Documents: English (Wikipedia, C4, Shakespeare, WikiText-2) and Chinese (classics) from
DATA/corpus (--data DATA, ../shared/data by default), labelled by their source. Model loading
is timed separately.

    python benches/langid.py [--docs 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

from llm_lifecycle.workflows.data.clean import LANGUAGE_CANDIDATES

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # the default --data: beside the clone


def labelled(corpus: Path, n: int) -> list[tuple[str, str]]:
    read = lambda name: (corpus / name).read_text(encoding="utf-8")  # noqa: E731
    en = [line for line in read("en_wiki_demo.txt").splitlines() if line.strip()]
    en += [json.loads(line)["text"] for line in read("en_c4_demo.jsonl").splitlines()]
    en += [p for p in re.split(r"\n\s*\n", read("en_tinyshakespeare.txt")) if len(p) > 100]
    en += [p for p in re.split(r"\n \n", read("en_wikitext2_test_tokenized.txt")) if len(p) > 100]
    zh = [p for p in re.split(r"\n\s*\n", read("zh_chinese_poetry_classics.txt")) if len(p) > 30]
    rng = random.Random(0)
    docs = [(t, "en") for t in rng.sample(en, n // 2)] + [(t, "zh") for t in rng.sample(zh, n - n // 2)]
    rng.shuffle(docs)
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--data", type=Path, default=SHARED_DATA,
                        help="the benchmark data folder (its corpus/ holds the source texts; not in the repository)")
    args = parser.parse_args()
    docs = labelled(args.data / "corpus", args.docs)
    texts = [t[:1000] for t, _ in docs]
    languages = [Language.from_iso_code_639_1(getattr(IsoCode639_1, c.upper())) for c in LANGUAGE_CANDIDATES]
    print(f"{len(docs)} documents ({sum(1 for _, l in docs if l == 'zh')} Chinese), "
          f"{len(LANGUAGE_CANDIDATES)} candidate languages\n")
    print("| lingua mode | model load s | docs/s | accuracy |")
    print("|---|---|---|---|")
    for name in ("low accuracy (ours)", "high accuracy"):
        t0 = time.perf_counter()
        builder = LanguageDetectorBuilder.from_languages(*languages)
        builder = builder.with_low_accuracy_mode() if name.startswith("low") else builder.with_preloaded_language_models()
        detector = builder.build()
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        found = detector.detect_languages_in_parallel_of(texts)
        seconds = time.perf_counter() - t0
        right = sum(1 for f, (_, label) in zip(found, docs) if f is not None and f.iso_code_639_1.name.lower() == label)
        print(f"| {name} | {load:.1f} | {len(docs) / seconds:,.0f} | {right / len(docs):.3f} |", flush=True)


if __name__ == "__main__":
    main()
