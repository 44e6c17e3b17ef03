"""Benchmarks from local files in their official layouts, handed to lm-eval's own tasks.

A data folder holds one sub-folder per benchmark:

    DIR/mmlu/{dev,val,test}/<subject>_<split>.csv   no header: question,A,B,C,D,answer-letter
    DIR/ceval/{dev,val}/<subject>_<split>.csv       header: id,question,A,B,C,D,answer[,explanation]
    DIR/cmmlu/{dev,test}/<subject>.csv              header: ,Question,A,B,C,D,Answer
    DIR/gsm8k/{train,test}.jsonl                    {"question", "answer"}

`build_mirror` converts one benchmark into one JSON file per hub config (subject) holding the
splits and columns of the hub repository lm-eval's task points at; lm-eval's own task then
runs unchanged except that its `custom_dataset` hook (`load_config`) reads that file. That hook
skips `datasets.load_dataset`, whose dataset-card parsing and Arrow caching cost ~1 s per MMLU
subject, more than scoring them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

BUILTIN_DATA_DIR = Path(__file__).parent / "builtin"

# What the shipped mirror's splits really are (see builtin/PROVENANCE.md); copied into reports.
BUILTIN_SPLIT_NOTES = {
    "gsm8k": "gsm8k 'test' is the builtin mirror: the last 200 rows of the official GSM8K train split, "
    "held out from the few-shot pool (train rows 1-200); not comparable with GSM8K test scores",
}


class EvalError(ValueError):
    """A problem the user can fix (unknown suite, missing or malformed data)."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    hub_dataset: str  # where lm-eval reads it when no data folder is given
    layout: str  # the files we look for, for error messages


BENCHMARKS = {
    "mmlu": Benchmark("mmlu", "cais/mmlu", "mmlu/{test,val,dev}/<subject>_<split>.csv (official MMLU CSVs, no header)"),
    "ceval": Benchmark(
        "ceval", "ceval/ceval-exam", "ceval/{val,dev}/<subject>_<split>.csv (official C-Eval CSVs, with header)"
    ),
    "cmmlu": Benchmark(
        "cmmlu", "haonan-li/cmmlu", "cmmlu/{test,dev}/<subject>.csv (official CMMLU CSVs, header ,Question,A,B,C,D,Answer)"
    ),
    "gsm8k": Benchmark("gsm8k", "openai/gsm8k", "gsm8k/test.jsonl and gsm8k/train.jsonl (official GSM8K jsonl)"),
}


@dataclass
class LocalMirror:
    """A converted benchmark: where it is, what to override in lm-eval's task configs, which splits."""

    path: Path
    task_overrides: dict
    splits: dict[str, str]  # role ("eval", "fewshot") -> the official split name used
    notes: list[str] = field(default_factory=list)


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """None stays None (lm-eval reads the hub); 'builtin' is the shipped mirror."""
    if data_dir is None:
        return None
    if str(data_dir) == "builtin":
        return BUILTIN_DATA_DIR
    return Path(data_dir).expanduser()


def build_mirror(benchmark: str, data_dir: Path, subjects: list[str], out_dir: Path, fewshot: int) -> LocalMirror:
    """Convert `data_dir/<benchmark>` into a hub-shaped folder under `out_dir`.

    `subjects` are the dataset config names lm-eval's tasks ask for (e.g. 'abstract_algebra'),
    ignored for GSM8K which has one config. Each must hold `fewshot` few-shot examples.
    """
    build = {"mmlu": _mmlu, "ceval": _ceval, "cmmlu": _cmmlu, "gsm8k": _gsm8k}[benchmark]
    mirror = build(data_dir / benchmark, subjects, out_dir / benchmark)
    _check_fewshot_pool(mirror, data_dir / benchmark, fewshot)
    if data_dir.resolve() == BUILTIN_DATA_DIR.resolve() and benchmark in BUILTIN_SPLIT_NOTES:
        mirror.notes.append(BUILTIN_SPLIT_NOTES[benchmark])
    return mirror


def _check_fewshot_pool(mirror: LocalMirror, root: Path, fewshot: int) -> None:
    """lm-eval asserts (a page of traceback) when a subject has fewer few-shot rows than asked."""
    split = mirror.splits["fewshot"]
    for file in sorted(mirror.path.glob("*.json")):
        rows = len(json.loads(file.read_text(encoding="utf-8"))[split])
        if rows < fewshot:
            raise EvalError(f"{root}: {file.stem} has {rows} rows in its few-shot split '{split}', fewer than the "
                            f"{fewshot} few-shot examples asked for; add rows or pass --num-fewshot {rows}")


def _mmlu(root: Path, subjects: list[str], out: Path) -> LocalMirror:
    """MMLU as `cais/mmlu`: columns question, subject, choices, answer (0-3); splits test/validation/dev."""
    _require_split(root, "dev", subjects, "mmlu", "few-shot examples")
    notes = []
    if (root / "test").is_dir():
        _require_split(root, "test", subjects, "mmlu", "the evaluation split")
        eval_split = "test"
    else:
        _require_split(root, "val", subjects, "mmlu", "the evaluation split (no test/ folder found)")
        eval_split = "val"
        notes.append(f"mmlu: no test split in {root}; evaluated on the official val split instead")
    hub_split = {"test": "test", "val": "validation", "dev": "dev"}

    def rows(subject: str, split: str):
        for line_no, row in enumerate(_read_csv(root / split / f"{subject}_{split}.csv"), 1):
            if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                where = root / split / f"{subject}_{split}.csv"
                raise EvalError(f"{where}:{line_no}: expected 6 columns: question,A,B,C,D,answer-letter")
            yield {"question": row[0], "subject": subject, "choices": row[1:5], "answer": "ABCD".index(row[5].strip())}

    configs = {
        s: {hub_split[split]: list(rows(s, split)) for split in (eval_split, "dev")} for s in subjects
    }
    overrides = {} if eval_split == "test" else {"test_split": "validation"}
    return _write_mirror(out, configs, overrides, {"eval": eval_split, "fewshot": "dev"}, notes)


def _ceval(root: Path, subjects: list[str], out: Path) -> LocalMirror:
    """C-Eval as `ceval/ceval-exam`: columns id, question, A-D, answer (letter), explanation; splits val/dev."""
    for split, role in (("val", "the evaluation split"), ("dev", "few-shot examples")):
        _require_split(root, split, subjects, "ceval", role)

    def rows(subject: str, split: str):
        path = root / split / f"{subject}_{split}.csv"
        reader = _read_csv(path)
        header = next(reader, [])
        missing = {"id", "question", "A", "B", "C", "D", "answer"} - set(header)
        if missing:
            raise EvalError(
                f"{path}: header lacks {sorted(missing)}; expected id,question,A,B,C,D,answer[,explanation]"
            )
        for row in reader:
            record = dict(zip(header, row))
            yield {
                "id": int(record["id"]),
                **{k: record[k] for k in ("question", "A", "B", "C", "D", "answer")},
                "explanation": record.get("explanation", ""),
            }

    configs = {s: {split: list(rows(s, split)) for split in ("val", "dev")} for s in subjects}
    return _write_mirror(out, configs, {}, {"eval": "val", "fewshot": "dev"}, [])


def _cmmlu(root: Path, subjects: list[str], out: Path) -> LocalMirror:
    """CMMLU as `haonan-li/cmmlu`: columns Question, A-D, Answer (letter); splits test/dev; files
    `<split>/<subject>.csv` (no split suffix, unlike MMLU and C-Eval)."""
    for split, role in (("test", "the evaluation split"), ("dev", "few-shot examples")):
        missing = [root / split / f"{s}.csv" for s in subjects if not (root / split / f"{s}.csv").is_file()]
        if missing:
            raise EvalError(f"cmmlu: {role} not found: missing {_shown(missing)}; "
                            f"expected the official layout {BENCHMARKS['cmmlu'].layout} under the data folder")

    def rows(subject: str, split: str):
        path = root / split / f"{subject}.csv"
        reader = _read_csv(path)
        header = next(reader, [])
        missing = {"Question", "A", "B", "C", "D", "Answer"} - set(header)
        if missing:
            raise EvalError(f"{path}: header lacks {sorted(missing)}; expected ,Question,A,B,C,D,Answer")
        for row in reader:
            record = dict(zip(header, row))
            yield {k: record[k] for k in ("Question", "A", "B", "C", "D", "Answer")}

    configs = {s: {split: list(rows(s, split)) for split in ("test", "dev")} for s in subjects}
    return _write_mirror(out, configs, {}, {"eval": "test", "fewshot": "dev"}, [])


def _gsm8k(root: Path, subjects: list[str], out: Path) -> LocalMirror:
    """GSM8K as `openai/gsm8k` config `main`: columns question, answer; splits train/test."""
    paths = {split: root / f"{split}.jsonl" for split in ("test", "train")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise EvalError(
            f"gsm8k: missing {', '.join(missing)} (test is evaluated, train gives the few-shot examples); "
            f"put the official GSM8K jsonl files there, or use --data-dir builtin"
        )

    def rows(path: Path):
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError) as err:
                    raise EvalError(f"{path}:{line_no}: not a JSON object ({str(err)[:120]}); "
                                    "each line must be one GSM8K record") from None
                if not isinstance(record, dict) or not {"question", "answer"} <= record.keys():
                    raise EvalError(f"{path}:{line_no}: expected keys 'question' and 'answer'")
                yield {"question": record["question"], "answer": record["answer"]}

    configs = {"main": {split: list(rows(path)) for split, path in paths.items()}}
    return _write_mirror(out, configs, {}, {"eval": "test", "fewshot": "train"}, [])


def _require_split(root: Path, split: str, subjects: list[str], benchmark: str, role: str) -> None:
    missing = [root / split / f"{s}_{split}.csv" for s in subjects if not (root / split / f"{s}_{split}.csv").is_file()]
    if missing:
        raise EvalError(
            f"{benchmark}: {role} not found: missing {_shown(missing)}; "
            f"expected the official layout {BENCHMARKS[benchmark].layout} under the data folder"
        )


def _shown(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def _read_csv(path: Path):
    with path.open(newline="", encoding="utf-8") as f:
        yield from csv.reader(f)


def _write_mirror(out: Path, configs: dict, overrides: dict, splits: dict, notes: list) -> LocalMirror:
    """One `<config>.json` per hub config: {split: [records]}."""
    out.mkdir(parents=True, exist_ok=True)
    for name, by_split in configs.items():
        (out / f"{name}.json").write_text(json.dumps(by_split, ensure_ascii=False), encoding="utf-8")
    return LocalMirror(out, dict(overrides), splits, list(notes))


def load_config(file: str, **_task_metadata):
    """lm-eval's `custom_dataset` hook: one converted config as a DatasetDict (lm-eval passes the
    task's metadata, e.g. its version, as keyword arguments too)."""
    import datasets

    by_split = json.loads(Path(file).read_text(encoding="utf-8"))
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in by_split.items()})
