"""Data stages on real text: fetch (builtin, local txt/jsonl/parquet, hf:// offline), clean
(rule filters, exact and near dedup, held-out split), tokenizer training and token shards."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import csv  # noqa: E402
import gzip  # noqa: E402
import io  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import unicodedata  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from llm_lifecycle.workflows import refs  # noqa: E402
from llm_lifecycle.workflows.data import bpe, clean, dedup, encode, shards, sources  # noqa: E402
from llm_lifecycle.workflows import stages as kinds  # noqa: E402
from llm_lifecycle.workflows.runner.settings import build  # noqa: E402


def tokenizer_config(cfg: dict) -> bpe.TokenizerConfig:
    return build(bpe.TokenizerConfig, cfg, "stages.tokenizer-train")
from llm_lifecycle.workflows.runner.stage import StageContext, StageResult, UserError  # noqa: E402

C4_FILE = refs.BUILTIN_DIR / "corpus" / "en_c4_demo.jsonl.gz"
POETRY_FILE = refs.BUILTIN_DIR / "corpus" / "zh_chinese_poetry.jsonl.gz"


# ---------------------------------------------------------------------------------------
# A StageContext with an in-memory tracker and a progress that records what it was told.


class MemoryTracker:
    def __init__(self):
        self.metrics: dict[str, float] = {}
        self.params: dict = {}
        self.artifacts: list[Path] = []
        self.dicts: dict[str, dict | list] = {}
        self.texts: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.inputs: list[tuple[Path, str, str]] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_params(self, params):
        self.params.update(params)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(Path(path))

    def log_dict(self, data, artifact_file):
        self.dicts[artifact_file] = data

    def log_text(self, text, artifact_file):
        self.texts[artifact_file] = text

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_input(self, path, name, context):
        assert Path(path).exists()
        self.inputs.append((Path(path), name, context))


class RecordingTask:
    def __init__(self):
        self.done = 0.0

    def advance(self, n=1):
        self.done += n

    def update(self, *, total=None, description=None, info=None):
        pass


class RecordingProgress:
    def __init__(self):
        self.tasks: dict[str, RecordingTask] = {}
        self.messages: list[str] = []

    @contextmanager
    def task(self, description, total=None):
        self.tasks[description] = RecordingTask()
        yield self.tasks[description]

    def log(self, message):
        self.messages.append(message)


# Which earlier stage's result each data stage takes on each of its input ports.
DATA_PORTS = {"data-clean": {"documents": "data-fetch"}, "tokenizer-train": {"text": "data-clean"},
              "tokenize": {"text": "data-clean", "tokenizer": "tokenizer-train"}}


def make_ctx(root: Path, stage: str, results: dict[str, StageResult] | None = None, seed: int = 0) -> StageContext:
    stage_dir = root / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    sources = DATA_PORTS.get(stage, {})
    return StageContext(
        stage=stage,
        kind=stage,
        recipe=SimpleNamespace(name="test"),
        workspace=root,
        stage_dir=stage_dir,
        inputs={port: (results or {})[source] for port, source in sources.items() if source in (results or {})},
        sources=dict(sources),
        values={},
        tracker=MemoryTracker(),
        progress=RecordingProgress(),
        seed=seed,
    )


def run_stage(ctx: StageContext, cfg: dict) -> StageResult:
    """The stage kind `ctx.kind` run with `cfg` validated into its typed settings."""
    spec = kinds.kind(ctx.kind)
    return spec.run(ctx, build(spec.settings, cfg, f"stages.{ctx.kind}"))


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def builtin_texts(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


# ---------------------------------------------------------------------------------------
# The whole builtin corpus through the four stages, once per module.


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-stages")
    start = time.perf_counter()
    ctxs, results = {}, {}
    for stage, cfg in [
        ("data-fetch", {"sources": [{"uri": "builtin:corpus"}]}),
        ("data-clean", {}),
        ("tokenizer-train", {"vocab_size": 1024}),
        ("tokenize", {"shard_tokens": 1 << 16}),
    ]:
        ctxs[stage] = make_ctx(root, stage, results)
        results[stage] = run_stage(ctxs[stage], cfg)
    return SimpleNamespace(root=root, ctx=ctxs, result=results, seconds=time.perf_counter() - start)


def test_builtin_corpus_runs_all_data_stages_quickly(pipeline):
    assert pipeline.seconds < 60, f"fetch+clean+tokenizer+tokenize took {pipeline.seconds:.0f} s"
    fetch = pipeline.result["data-fetch"]
    docs = read_jsonl(fetch.outputs["documents"])
    assert len(docs) == fetch.metrics["fetch.docs"] > 4000
    sources = {d["source"] for d in docs}
    assert sources == {
        f"builtin:corpus/{f}"
        for f in (
            "en_c4_demo.jsonl.gz",
            "en_tinyshakespeare.jsonl.gz",
            "en_wiki_demo.jsonl.gz",
            "zh_chinese_poetry.jsonl.gz",
        )
    }
    [(path, name, context)] = pipeline.ctx["data-fetch"].tracker.inputs
    assert (path.resolve(), name, context) == ((refs.BUILTIN_DIR / "corpus").resolve(), "builtin:corpus", "data-fetch")
    assert fetch.metrics["fetch.builtin:corpus.chars"] == sum(len(d["text"]) for d in docs)


def test_clean_report_and_metrics_on_builtin(pipeline):
    clean = pipeline.result["data-clean"]
    report = json.loads(Path(clean.outputs["report"]).read_text())
    assert pipeline.ctx["data-clean"].tracker.dicts["report.json"] == report
    train, heldout = read_jsonl(clean.outputs["clean"]), read_jsonl(clean.outputs["heldout"])
    assert report["kept"] == len(train) + len(heldout) == clean.metrics["clean.kept"]
    removed = sum(step["removed"] for step in report["steps"].values())
    assert report["kept"] + removed == report["input_documents"]
    # Shakespeare's one-line speeches are below min_chars; the examples show them, truncated.
    assert report["steps"]["min_chars"]["removed"] > 0 and 1 <= len(report["steps"]["min_chars"]["examples"]) <= 3
    assert clean.metrics["clean.removed.min_chars"] == report["steps"]["min_chars"]["removed"]
    assert 0.005 < len(heldout) / report["kept"] < 0.05  # holdout_fraction 0.02
    assert any(dedup.is_cjk(d["text"]) for d in heldout) and any(not dedup.is_cjk(d["text"]) for d in heldout)
    assert not {d["text"] for d in heldout} & {d["text"] for d in train}


# ---------------------------------------------------------------------------------------
# data-fetch


def fetch_docs(tmp_path, sources, seed=0) -> tuple[list[dict], StageResult]:
    ctx = make_ctx(tmp_path, "data-fetch", seed=seed)
    result = run_stage(ctx, {"sources": sources})
    return read_jsonl(result.outputs["documents"]), result


def test_fetch_local_txt_splits(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("first line\nsecond line\n\n\nthird line\n  \nfourth\n", encoding="utf-8")
    by_split = {s: fetch_docs(tmp_path / s, [{"uri": str(txt), "split": s}])[0] for s in sources.TXT_SPLITS}
    assert [d["text"] for d in by_split["paragraph"]] == ["first line\nsecond line", "third line", "fourth"]
    assert [d["text"] for d in by_split["line"]] == ["first line", "second line", "third line", "fourth"]
    assert [d["text"] for d in by_split["file"]] == ["first line\nsecond line\n\n\nthird line\n  \nfourth"]
    assert {d["source"] for d in by_split["line"]} == {str(txt)}


def test_fetch_local_folder_of_jsonl_gz_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text('{"content": "alpha doc", "id": 1}\n\n{"content": "beta doc"}\n', encoding="utf-8")
    with gzip.open(folder / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"content": "中文文档 gamma"}, ensure_ascii=False) + "\n")
    pq.write_table(pa.table({"content": ["delta doc", None, "epsilon doc"], "n": [1, 2, 3]}), folder / "c.parquet")
    (folder / "README.md").write_text("not data", encoding="utf-8")
    docs, result = fetch_docs(tmp_path, [{"uri": str(folder), "text_field": "content"}])
    assert [(d["text"], d["source"]) for d in docs] == [
        ("alpha doc", f"{folder}/a.jsonl"),
        ("beta doc", f"{folder}/a.jsonl"),
        ("delta doc", f"{folder}/c.parquet"),
        ("epsilon doc", f"{folder}/c.parquet"),
        ("中文文档 gamma", f"{folder}/sub/b.jsonl.gz"),
    ]
    assert result.metrics["fetch.docs"] == 5

    with pytest.raises(UserError, match=r"a\.jsonl:1: no field 'text' \(has: content, id\)"):
        fetch_docs(tmp_path / "default-field", [{"uri": str(folder / "a.jsonl")}])
    with pytest.raises(UserError, match="no column 'text'"):
        fetch_docs(tmp_path / "parquet-field", [{"uri": str(folder / "c.parquet")}])


def test_fetch_weights_and_limits(tmp_path):
    c4 = "builtin:corpus/en_c4_demo.jsonl.gz"
    poems = "builtin:corpus/zh_chinese_poetry.jsonl.gz"
    docs, result = fetch_docs(
        tmp_path / "a", [{"uri": c4, "limit": 30, "weight": 2}, {"uri": poems, "limit": 400, "weight": 0.5}]
    )
    c4_docs = [d for d in docs if d["source"] == c4]
    poem_docs = [d for d in docs if d["source"] == poems]
    assert len(c4_docs) == 30 and {d["repeat"] for d in c4_docs} == {2}
    assert {d["repeat"] for d in poem_docs} == {1} and 150 < len(poem_docs) < 250
    assert result.metrics[f"fetch.{c4}.weighted_docs"] == 60 and result.metrics[f"fetch.{poems}.docs"] == 400
    again, _ = fetch_docs(
        tmp_path / "b", [{"uri": c4, "limit": 30, "weight": 2}, {"uri": poems, "limit": 400, "weight": 0.5}]
    )
    assert again == docs  # the fractional sample is deterministic


def test_fetch_errors_are_one_clear_line(tmp_path):
    missing = tmp_path / "no" / "such.jsonl"
    with pytest.raises(UserError) as err:
        fetch_docs(tmp_path, [{"uri": "builtin:corpus"}, {"uri": str(missing)}])
    assert "stages.data-fetch.sources[1].uri" in str(err.value) and str(missing) in str(err.value)

    with pytest.raises(UserError) as err:
        fetch_docs(tmp_path, [{"uri": "builtin:nope"}])
    assert "builtin:nope" in str(err.value) and "builtin:corpus" in str(err.value)

    with pytest.raises(UserError, match=r"sources\[0\]\.uri: no \.txt, \.jsonl, \.jsonl\.gz, \.parquet, \.csv files at"):
        fetch_docs(tmp_path, [{"uri": "builtin:chat/zh_oasst1_sft_zh.json"}])

    with pytest.raises(UserError, match=r"sources\[0\]\.wieght: unknown setting"):
        fetch_docs(tmp_path, [{"uri": "builtin:corpus", "wieght": 2}])


def test_fetch_hf_offline_is_a_user_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        fetch_docs(tmp_path, [{"uri": "hf://datasets/llm-lifecycle-tests/not-cached/data/train.jsonl"}])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("stages.data-fetch.sources[0].uri: cannot reach the Hugging Face hub to fetch "
                              "dataset hf://datasets/llm-lifecycle-tests/not-cached:")
    assert "builtin:NAME" in message


def csv_text(header: list[str], rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def make_hub_cache(root: Path, repo: str, commit: str, files: dict[str, str], refs: tuple[str, ...] = ("main",)) -> Path:
    """A Hugging Face hub cache holding one dataset snapshot, laid out as huggingface_hub writes it."""
    repo_dir = root / f"datasets--{repo.replace('/', '--')}"
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    for name, text in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(text.encode()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_text(text, encoding="utf-8")
        link = repo_dir / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    return root


def test_fetch_hf_dataset_from_a_prepared_offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    english, _ = distinct_docs()
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = make_hub_cache(tmp_path / "hub", "acme/corpus", commit, {
        "data/train.jsonl": "".join(json.dumps({"body": t}) + "\n" for t in english[:5]),
        "data/extra.csv": csv_text(["id", "body"], [[i, t] for i, t in enumerate(english[5:8])]),
        "README.md": "# a dataset card",
    }, refs=("main", "v1.0"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    docs, result = fetch_docs(tmp_path / "a", [
        {"uri": "hf://datasets/acme/corpus/data", "text_field": "body", "revision": "v1.0"},
    ])
    assert [d["text"] for d in docs] == english[5:8] + english[:5]  # the files in path order
    assert [docs[0]["source"], docs[-1]["source"]] == [
        "hf://datasets/acme/corpus/data/extra.csv", "hf://datasets/acme/corpus/data/train.jsonl"]
    pinned, _ = fetch_docs(tmp_path / "b", [
        {"uri": f"hf://datasets/acme/corpus@{commit}", "text_field": "body", "allow_patterns": ["data/*.jsonl"]},
    ])
    assert [d["text"] for d in pinned] == english[:5]  # only the files the patterns allow
    with pytest.raises(UserError, match="cannot reach the Hugging Face hub"):
        fetch_docs(tmp_path / "c", [{"uri": "hf://datasets/acme/corpus", "revision": "v2.0"}])


# ---------------------------------------------------------------------------------------
# data-clean


def distinct_docs() -> tuple[list[str], list[str]]:
    english = [
        t for t in builtin_texts(C4_FILE) if 400 <= len(t) <= 5000 and not clean.rule_failure(t, clean.QualityRules())
    ][:25]
    chinese = [t for t in builtin_texts(POETRY_FILE) if len(t) >= 150][:15]
    return english, chinese


def run_clean(tmp_path, docs: list[dict], cfg: dict | None = None) -> tuple[StageResult, MemoryTracker]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    documents = tmp_path / "documents.jsonl"
    documents.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    ctx = make_ctx(tmp_path, "data-clean", {"data-fetch": StageResult(outputs={"documents": str(documents)})})
    return run_stage(ctx, cfg or {}), ctx.tracker


def test_clean_removes_planted_exact_and_near_duplicates(tmp_path):
    english, chinese = distinct_docs()
    exact_copy = "  " + english[3].upper().replace(" ", "   \n") + " "  # same after NFKC/lower/whitespace
    words = english[7].split()
    words[len(words) // 2] = "zebra"
    near_copy = " ".join(words)
    near_copy_zh = chinese[2][:60] + "鹤" + chinese[2][61:]
    texts = english + chinese + [exact_copy, near_copy, near_copy_zh]
    result, tracker = run_clean(tmp_path, [{"text": t, "source": "test", "repeat": 1} for t in texts])

    report = json.loads(Path(result.outputs["report"]).read_text())
    assert report["steps"]["exact_dedup"]["removed"] == 1
    assert report["steps"]["minhash_dedup"]["removed"] == 2
    assert {e["text"][:40] for e in report["steps"]["minhash_dedup"]["examples"]} == {near_copy[:40], near_copy_zh[:40]}
    assert result.metrics["clean.removed.exact_dedup"] == 1 and result.metrics["clean.removed.minhash_dedup"] == 2
    kept = [d["text"] for d in read_jsonl(result.outputs["clean"]) + read_jsonl(result.outputs["heldout"])]
    assert sorted(kept) == sorted(english + chinese)  # every distinct document survives, once
    assert tracker.dicts["report.json"] == report


def test_clean_repeats_survive_dedup_and_holdout_is_by_content(tmp_path):
    english, chinese = distinct_docs()
    docs = [{"text": t, "source": "en", "repeat": 3} for t in english] + [{"text": t, "source": "zh"} for t in chinese]
    result, _ = run_clean(tmp_path / "a", docs, {"holdout_fraction": 0.2})
    train, heldout = read_jsonl(result.outputs["clean"]), read_jsonl(result.outputs["heldout"])
    assert heldout and len({d["text"] for d in heldout}) == len(heldout)
    for text in english:
        copies = sum(d["text"] == text for d in train)
        assert copies == (0 if text in {d["text"] for d in heldout} else 3)

    reordered, _ = run_clean(tmp_path / "b", docs[::-1], {"holdout_fraction": 0.2})
    assert {d["text"] for d in read_jsonl(reordered.outputs["heldout"])} == {d["text"] for d in heldout}


def test_rule_filters_measure_cjk_in_characters():
    rules = clean.QualityRules()
    english, chinese = distinct_docs()
    assert clean.rule_failure(english[0], rules) is None
    assert all(clean.rule_failure(t, rules) is None for t in chinese)  # no spaces, yet not "one long word"
    assert clean.rule_failure("a b c d e f g h i j k l m n o p", rules) == "mean_word_length"
    assert clean.rule_failure("### Title ### more ### words ### here " * 5, rules) == "symbol_ratio"
    assert (
        clean.rule_failure(
            "\n".join(
                [
                    "then the old man walked slowly down the long road into town...",
                    "and nobody there had seen him for years and years...",
                    "a plain line of text",
                ]
            ),
            rules,
        )
        == "ellipsis_lines"
    )
    assert (
        clean.rule_failure("\n".join(["Click here to subscribe now"] * 5 + ["The actual content"]), rules)
        == "duplicate_lines"
    )
    assert clean.word_count("床前明月光 moon light") == 7


def test_optional_gopher_and_c4_rules():
    rules = clean.QualityRules(min_alpha_word_fraction=0.8, min_stop_words=2, max_bullet_line_fraction=0.9,
                              c4_bad_content=True)
    english, chinese = distinct_docs()
    assert clean.rule_failure(english[0], rules) is None and clean.rule_failure(chinese[0], rules) is None
    assert clean.rule_failure("1234 5678 9012 3456 7890 the and of 2345 6789 0123 4567", rules) == "alpha_words"
    assert clean.rule_failure("Buy cheap watches online today, great prices, fast shipping guaranteed", rules) == "stop_words"
    bullets = "\n".join(f"• item {w} of the list and more" for w in "one two three four five six seven".split())
    assert clean.rule_failure(bullets, rules) == "bullet_lines"
    assert clean.rule_failure(english[0] + " Lorem ipsum dolor sit amet.", rules) == "c4_bad_content"
    assert clean.rule_failure(bullets, clean.QualityRules()) is None  # off by default


def test_clean_language_id_keeps_the_chosen_languages(tmp_path):
    english, chinese = distinct_docs()
    french = ("Le petit prince est un conte poétique et philosophique sous l'apparence d'un conte pour enfants, "
              "écrit par Antoine de Saint-Exupéry et publié en 1943 à New York.")
    german = ("Die Verwandlung ist eine Erzählung von Franz Kafka, die im Jahr 1912 entstand und 1915 erschien; "
              "sie handelt von Gregor Samsa, der eines Morgens als Ungeziefer erwacht.")
    docs = [{"text": t, "source": "t", "repeat": 1} for t in english[:5] + chinese[:5] + [french, german]]
    result, tracker = run_clean(tmp_path, docs, {"languages": ["en", "ZH"], "holdout_fraction": 0})
    report = json.loads(Path(result.outputs["report"]).read_text())
    assert report["steps"]["language"]["removed"] == 2 and result.metrics["clean.removed.language"] == 2
    notes = {e["note"] for e in report["steps"]["language"]["examples"]}
    assert notes == {"detected: fr", "detected: de"}
    assert report["train_documents"] == 10
    with pytest.raises(UserError, match="'klingon' is not an ISO 639-1 code"):
        run_clean(tmp_path / "bad", docs, {"languages": ["klingon"]})


def test_clean_with_everything_removed_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="removed all 1 documents"):
        run_clean(tmp_path, [{"text": "too short", "source": "x"}])


# ---------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_specials_digits_and_chinese(pipeline):
    path = pipeline.result["tokenizer-train"].outputs["tokenizer"]
    tok = Tokenizer.from_file(path)
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.get_vocab_size() == 1024

    ids = tok.encode("In 2024, 31415 people paid $1999.").ids
    pieces = [tok.decode([i]) for i in ids]
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces)
    assert [p.strip() for p in pieces if any(c.isdigit() for c in p)] == list("2024") + list("31415") + list("1999")

    # Seen and unseen characters (a rare CJK Extension B ideograph, an emoji) round-trip: byte fallback.
    for text in ["关关雎鸠，在河之洲。窈窕淑女，君子好逑。", "学而时习之，不亦说乎？𠀀🦙 mixed English 文本"]:
        assert tok.decode(tok.encode(text).ids) == unicodedata.normalize("NFC", text)
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>").ids[:1], skip_special_tokens=False) == "<|im_start|>"

    metrics = pipeline.result["tokenizer-train"].metrics
    assert metrics["vocab_size"] == 1024
    assert 1.0 < metrics["bytes_per_token.zh"] and 1.5 < metrics["bytes_per_token.en"]


def test_tokenizer_vocab_too_small_is_a_user_error():
    with pytest.raises(UserError, match="vocab_size: 100 is below 265"):
        bpe.train_bpe(["some text"], vocab_size=100)


def small_corpus() -> list[str]:
    return builtin_texts(C4_FILE)[:60] + builtin_texts(POETRY_FILE)[:400]


def test_tokenizer_options_whitespace_runs_specials_and_byte_fallback():
    texts = small_corpus()
    tok = bpe.train_bpe(texts, vocab_size=700, whitespace_runs=8, special_tokens=["<|tool|>", "<|im_start|>"])
    assert tok.get_vocab_size() <= 700
    # the recipe's own special tokens follow ChatML's and the six chat-markup tokens (ids 3..8)
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|tool|>")] == [0, 1, 2, 9]
    code = "def f(x):\n        return x  # 12345"
    pieces = [tok.id_to_token(i) for i in tok.encode(code).ids]
    assert "\u0120" * 7 in pieces and "\u0120re" in pieces  # a 7-space run, and the word keeps its space
    assert tok.decode(tok.encode(code).ids) == code

    fallback = bpe.train_bpe(texts, vocab_size=700, byte_fallback=True)
    assert fallback.get_vocab_size() == 700 and fallback.token_to_id("<0xE4>") is not None
    rare = "𠀀🦙 mixed English 文本 123"  # characters never seen in training
    ids = fallback.encode(rare).ids
    assert any(fallback.id_to_token(i).startswith("<0x") for i in ids)
    assert fallback.decode(ids) == rare
    with pytest.raises(UserError, match="whitespace_runs: needs the byte-level model"):
        tokenizer_config({"byte_fallback": True, "whitespace_runs": 4})
    with pytest.raises(UserError, match="unknown setting"):
        tokenizer_config({"vocab": 10})


@pytest.mark.parametrize("byte_fallback", [True, False])
def test_decode_gives_back_the_text_with_its_spaces_and_rare_characters(byte_fallback):
    english, chinese = builtin_texts(C4_FILE), builtin_texts(POETRY_FILE)
    tok = bpe.train_bpe(english[:60] + chinese[:400], vocab_size=700, byte_fallback=byte_fallback)
    crafted = [
        " x", "x ", "  two leading spaces", "two trailing spaces  ", " ", "   ", "",
        " 关关雎鸠，在河之洲。 ", "\u3000全角空格\u3000", " 𠀀🦙 rare characters ", " 学而时习之 mixed English 文本 𪚥 ",
        "\tA tab, a newline \n and  double  spaces", " In 2024, 31415 people paid $1999. ",
    ]
    unseen = [english[-1], chinese[-1], english[-2][:200]]  # documents left out of training
    texts = crafted + [f" {t}  " for t in unseen] + [f"  {t}" for t in unseen]
    for text in texts:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == unicodedata.normalize("NFC", text), (text, [tok.id_to_token(i) for i in ids])
    if byte_fallback:  # the rare ones are spelled in <0xXX> tokens, so the fallback path is exercised
        ids = tok.encode(" 𠀀🦙 rare characters ").ids
        assert sum(tok.id_to_token(i).startswith("<0x") for i in ids) == 8


def test_extend_an_english_tokenizer_with_chinese_tokens_and_use_a_pretrained_one(tmp_path):
    english, chinese = builtin_texts(C4_FILE)[:80], builtin_texts(POETRY_FILE)
    base = bpe.train_bpe(english, vocab_size=400)
    base_file = tmp_path / "base" / "tokenizer.json"  # a checkpoint folder holding a tokenizer.json
    base_file.parent.mkdir()
    base.save(str(base_file))
    cfg = tokenizer_config({"vocab_size": 800, "extend": str(base_file.parent)})
    extended = bpe.build_tokenizer(cfg, english + chinese[:500])
    assert extended.get_vocab_size() == 800
    assert all(extended.id_to_token(i) == base.id_to_token(i) for i in range(400))  # old ids unchanged
    heldout = chinese[-100:]
    assert bpe.bytes_per_token(extended, heldout) > 1.3 * bpe.bytes_per_token(base, heldout)
    assert extended.encode(english[0]).ids == base.encode(english[0]).ids  # English untouched
    assert all(extended.decode(extended.encode(t).ids) == unicodedata.normalize("NFC", t) for t in heldout[:20])

    same = bpe.build_tokenizer(tokenizer_config({"vocab_size": 400, "pretrained": str(base_file)}), [])
    assert same.to_str() == base.to_str()
    with pytest.raises(UserError, match="is below the 400 tokens"):
        bpe.build_tokenizer(tokenizer_config({"vocab_size": 300, "pretrained": str(base_file)}), [])
    with pytest.raises(UserError, match="cannot reach the Hugging Face hub to fetch nobody/nothing"):
        bpe.load_tokenizer("nobody/nothing", "stages.tokenizer-train.pretrained")


def test_continued_pretraining_grows_the_init_model_to_its_extended_tokenizer():
    """Chinese-LLaMA: pretrain.init's model takes the tokenizer extended from its own; old
    tokens keep their rows (so their logits), new ones start as the mean row."""
    from llm_lifecycle.models.config import ModelConfig
    from llm_lifecycle.models.decoder import Decoder
    from llm_lifecycle.workflows.stages.pretrain import fit_to_tokenizer

    english, chinese = builtin_texts(C4_FILE)[:60], builtin_texts(POETRY_FILE)[:300]
    base = bpe.train_bpe(english, vocab_size=300)
    extended = bpe.extend_vocabulary(base, chinese, vocab_size=500)
    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64)).eval()
    grown = fit_to_tokenizer(model, base, extended, "models:/base@pretrain").eval()
    assert grown.cfg.vocab_size == 500 and grown.tok_embeddings.weight.shape == (500, 32)
    old_ids = torch.tensor([base.encode(english[0]).ids[:24]])
    with torch.no_grad():
        torch.testing.assert_close(grown(old_ids).logits[..., :300], model(old_ids).logits)
        new_rows = grown.tok_embeddings.weight[300:]
    torch.testing.assert_close(new_rows, model.tok_embeddings.weight.mean(0).expand(200, -1))
    assert fit_to_tokenizer(model, base, base, "x") is model

    reordered = bpe.train_bpe(chinese, vocab_size=300)  # a different tokenizer: ids would change meaning
    with pytest.raises(UserError, match="is not the start of tokenizer-train's") as err:
        fit_to_tokenizer(model, base, reordered, "models:/base@pretrain")
    assert "tokenizer-train.extend: models:/base@pretrain" in str(err.value)


def test_an_extended_tokenizer_goes_to_pretrain_init_not_to_sft_init():
    from llm_lifecycle.workflows.runner.recipe import ConfigError, load_recipe

    grow = load_recipe("llama-small", ["pretrain.init=org/model", "tokenizer-train.extend=org/model"])
    assert grow.settings("tokenizer-train").pretrained is None  # not filled in from init: it is extended
    with pytest.raises(ConfigError, match=r"stages.tokenizer-train.extend: SFT from stages.sft.init \(org/model\)"):
        load_recipe("llama-small", ["sft.init=org/model", "tokenizer-train.extend=org/tok"])


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["tokenizer-train.pretrained=org/tok", "tokenizer-train.byte_fallback=true"], ("byte_fallback", "pretrained")),
        (["tokenizer-train.pretrained=org/tok", "tokenizer-train.split_digits=true"], ("split_digits", "pretrained")),
        (["tokenizer-train.pretrained=org/tok", "tokenizer-train.min_frequency=3"], ("min_frequency", "pretrained")),
        (["tokenizer-train.extend=org/tok", "tokenizer-train.whitespace_runs=8"], ("whitespace_runs", "extend")),
        (["tokenizer-train.extend=org/tok", "tokenizer-train.split_digits=false"], ("split_digits", "extend")),
        (["pretrain.init=org/model", "tokenizer-train.byte_fallback=false"], ("byte_fallback", "pretrain.init")),
        (["sft.init=org/model", "tokenizer-train.whitespace_runs=4"], ("whitespace_runs", "sft.init")),
    ],
)
def test_training_settings_beside_a_tokenizer_not_trained_here_are_rejected(overrides, named):
    from llm_lifecycle.workflows.runner.recipe import ConfigError, load_recipe

    setting, source = named
    with pytest.raises(ConfigError) as err:
        load_recipe("llama-small", overrides)
    line = str(err.value)
    assert "\n" not in line and "llama-small.yaml" in line
    assert f"stages.tokenizer-train.{setting}: applies only to a tokenizer trained from scratch" in line
    assert f"stages.{source}" in line or f"stages.tokenizer-train.{source}" in line
    assert f"remove {setting}" in line


def test_settings_a_taken_or_extended_tokenizer_uses_are_accepted():
    from llm_lifecycle.workflows.runner.recipe import load_recipe

    extend = load_recipe("llama-small", ["tokenizer-train.extend=org/tok", "tokenizer-train.min_frequency=3"])
    assert extend.settings("tokenizer-train").min_frequency == 3  # extending trains on the Chinese text
    taken = load_recipe("llama-small", ["pretrain.init=org/model", "tokenizer-train.special_tokens=[<|tool|>]"])
    assert taken.settings("tokenizer-train").pretrained == "org/model"
    trained = load_recipe("llama-small", ["tokenizer-train.byte_fallback=true", "tokenizer-train.split_digits=false"])
    assert trained.settings("tokenizer-train").byte_fallback is True


# ---------------------------------------------------------------------------------------
# Tokenize and shards


def test_tokenize_packs_documents_with_end_of_text(pipeline):
    result = pipeline.result["tokenize"]
    tok = Tokenizer.from_file(pipeline.result["tokenizer-train"].outputs["tokenizer"])
    train = shards.TokenShards(result.outputs["train"])
    assert train.dtype == np.uint16 and len(train.shards) > 1  # 64 Ki-token shards
    assert len(train) == result.metrics["tokens.train"]
    clean_docs = read_jsonl(pipeline.result["data-clean"].outputs["clean"])
    assert train.num_documents == len(clean_docs) == result.metrics["documents.train"]
    offsets = np.asarray(train.doc_offsets)
    assert offsets[0] == 0 and offsets[-1] == len(train)
    assert all(train.tokens[int(end) - 1] == tok.token_to_id("<|endoftext|>") for end in offsets[1:])
    for i in (0, len(clean_docs) // 2, len(clean_docs) - 1):  # documents decode back to their text
        ids = train.tokens[int(offsets[i]) : int(offsets[i + 1]) - 1].tolist()
        assert tok.decode(ids) == unicodedata.normalize("NFC", clean_docs[i]["text"])
    heldout = shards.TokenShards(result.outputs["heldout"])
    assert len(heldout) == result.metrics["tokens.heldout"] > 1000


def test_parallel_encoding_is_identical_for_any_worker_count(pipeline, tmp_path):
    tok_path = pipeline.result["tokenizer-train"].outputs["tokenizer"]
    tok = Tokenizer.from_file(tok_path)
    text_path = pipeline.result["data-clean"].outputs["heldout"]
    written = {}
    for workers in (1, 2):
        parts = encode.encode_file(tok_path, 0, text_path, workers=workers, part_bytes=4096)  # many parts
        written[workers] = shards.write_parts(tmp_path / str(workers), parts, vocab_size=tok.get_vocab_size(),
                                              shard_tokens=5000)
    assert written[1] == written[2] and written[1].shards > 2
    files = [sorted(p.name for p in (tmp_path / str(w)).iterdir()) for w in (1, 2)]
    assert files[0] == files[1]
    assert all((tmp_path / "1" / f).read_bytes() == (tmp_path / "2" / f).read_bytes() for f in files[0])
    texts = [d["text"] for d in read_jsonl(text_path)]
    expected = np.concatenate([e.ids + [0] for e in tok.encode_batch(texts)])
    np.testing.assert_array_equal(np.asarray(shards.TokenShards(tmp_path / "2").tokens), expected)


def test_tokenize_rerun_writes_nothing(pipeline):
    out = Path(pipeline.result["tokenize"].outputs["train"])
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    ctx = make_ctx(pipeline.root, "tokenize", pipeline.result)
    again = run_stage(ctx, {"shard_tokens": 1 << 16})
    assert again.metrics == pipeline.result["tokenize"].metrics
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == before


def random_documents(n_docs: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(1, vocab, size=rng.integers(5, 60)), 0) for _ in range(n_docs)]


def test_write_shards_resumes_without_rewriting_complete_shards(tmp_path):
    docs = random_documents(200, vocab=500)
    stats = shards.write_shards(tmp_path, docs, vocab_size=500, shard_tokens=1000)
    assert stats.shards == stats.written == -(-stats.tokens // 1000) >= 4
    expected = np.concatenate(docs)

    def file_ids():
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.iterdir()}

    before = file_ids()
    assert shards.write_shards(tmp_path, docs, vocab_size=500, shard_tokens=1000).written == 0
    assert file_ids() == before  # a finished folder is left untouched, index included

    # A run killed while writing shard 2: the index lists shards 0-1, shard 2 is missing.
    index = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**index, "shards": index["shards"][:2], "complete": False}))
    (tmp_path / "shard_00002.bin").unlink()
    with pytest.raises(UserError, match="incomplete"):
        shards.TokenShards(tmp_path)
    resumed = shards.write_shards(tmp_path, docs, vocab_size=500, shard_tokens=1000)
    assert resumed.written == stats.shards - 2
    after = file_ids()
    assert all(after[f"shard_0000{i}.bin"] == before[f"shard_0000{i}.bin"] for i in (0, 1))
    np.testing.assert_array_equal(np.asarray(shards.TokenShards(tmp_path).tokens), expected)


def test_token_dtype_follows_vocabulary(tmp_path):
    assert shards.token_dtype(512) == np.uint16 and shards.token_dtype(65536) == np.uint16
    assert shards.token_dtype(65537) == np.uint32 and shards.token_dtype(151_936) == np.uint32
    shards.write_shards(tmp_path, [[70_000, 1, 151_935, 0]], vocab_size=151_936)
    big = shards.TokenShards(tmp_path)
    assert big.dtype == np.uint32 and (tmp_path / "shard_00000.bin").stat().st_size == 16
    assert big.tokens[:].tolist() == [70_000, 1, 151_935, 0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        shards.write_shards(tmp_path / "bad", [[3, 600]], vocab_size=512)


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    docs = random_documents(300, vocab=1000, seed=1)
    shards.write_shards(tmp_path, docs, vocab_size=1000, shard_tokens=777)  # windows cross shard ends
    packed = shards.TokenShards(tmp_path)
    all_windows = np.lib.stride_tricks.sliding_window_view(np.concatenate(docs), 32)
    stream = packed.batches(batch_size=4, seq_len=32, seed=7)
    first = [next(stream) for _ in range(6)]
    resumed = packed.batches(batch_size=4, seq_len=32, seed=7, start_step=3)
    for inputs, targets in first[3:]:
        again_inputs, again_targets = next(resumed)
        assert torch.equal(inputs, again_inputs) and torch.equal(targets, again_targets)
    assert torch.equal(packed.batch(5, batch_size=4, seq_len=32, seed=7)[0], first[5][0])
    for inputs, targets in first:
        assert inputs.shape == targets.shape == (4, 32) and inputs.dtype == torch.long
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for row in inputs.numpy():  # every row is a real window of the token stream
            assert (all_windows == row).all(axis=1).any()
    other_seed = next(packed.batches(batch_size=4, seq_len=32, seed=8))
    assert not torch.equal(other_seed[0], first[0][0])
    with pytest.raises(UserError, match="fewer than one window"):
        packed.batches(batch_size=1, seq_len=len(packed), seed=0)


def test_token_view_and_sequential_windows_cover_the_stream(tmp_path):
    docs = random_documents(50, vocab=300, seed=2) + [np.arange(1000) % 300] + random_documents(50, vocab=300, seed=3)
    stats = shards.write_shards(tmp_path, docs, vocab_size=300, shard_tokens=256)  # one document spans 4+ shards
    assert stats.shards == -(-stats.tokens // 256)
    packed = shards.TokenShards(tmp_path)
    stream = np.concatenate(docs)
    assert len(packed) == len(packed.tokens) == stream.size
    np.testing.assert_array_equal(packed.doc_offsets, np.cumsum([0] + [len(d) for d in docs]))
    np.testing.assert_array_equal(packed.tokens[250:530], stream[250:530])
    np.testing.assert_array_equal(packed.tokens[-5:], stream[-5:])
    assert packed.tokens[600] == stream[600]
    windows = list(packed.sequential_windows(seq_len=64, batch_size=3))
    inputs = torch.cat([w[0] for w in windows]).reshape(-1)
    targets = torch.cat([w[1] for w in windows]).reshape(-1)
    count = (stream.size - 1) // 64
    np.testing.assert_array_equal(inputs.numpy(), stream[: count * 64])
    np.testing.assert_array_equal(targets.numpy(), stream[1 : count * 64 + 1])
    assert len(list(packed.sequential_windows(seq_len=64, max_windows=2))) == 2


# ---------------------------------------------------------------------------------------
# Mixtures and schedules


def test_mixture_schedule_samples_groups_by_phase_and_long_documents(tmp_path):
    from llm_lifecycle.workflows.data.mixture import parse_schedule, phase_at, scheduled_batches
    from llm_lifecycle.workflows.engine.trainer import TrainSettings

    # Group "general" uses ids 10-19 in short documents, "knowledge" 20-29, "long" 30-39 in long ones.
    rng = np.random.default_rng(0)
    docs, groups = [], []
    for i in range(300):
        group = ["general", "knowledge", "long"][i % 3]
        base, size = {"general": (10, 20), "knowledge": (20, 20), "long": (30, 300)}[group]
        docs.append(np.append(rng.integers(base, base + 10, size=size), 0))
        groups.append(group)
    shards.write_shards(tmp_path, docs, vocab_size=64, shard_tokens=4096)
    shards.write_groups(tmp_path, groups)
    packed = shards.TokenShards(tmp_path)
    assert packed.group_names == ["general", "knowledge", "long"]

    schedule = parse_schedule(
        [{"until": 0.5, "mixture": {"general": 1.0}}, {"until": 1.0, "mixture": {"knowledge": 3, "general": 1}},
         ], "stages.pretrain.schedule")
    assert phase_at(schedule, 4, 10).mixture == {"general": 1.0} and phase_at(schedule, 5, 10).until == 1.0
    settings = TrainSettings(steps=10, batch_size=64, seq_len=8, grad_accum=1)
    stream = scheduled_batches(packed, schedule, settings, seed=3, start_micro_step=0)
    batches = [next(stream)[0] for _ in range(10)]

    def group_of(row):  # the group of a window's first token (windows may run into the next document)
        return int(row[0]) // 10 if row[0] else None

    first = [group_of(r) for b in batches[:5] for r in b if group_of(r)]
    later = [group_of(r) for b in batches[5:] for r in b if group_of(r)]
    assert set(first) == {1}
    assert 0.6 < later.count(2) / len(later) < 0.9 and set(later) == {1, 2}
    resumed = scheduled_batches(packed, schedule, settings, seed=3, start_micro_step=7)
    assert torch.equal(next(resumed)[0], batches[7])  # a resumed run reads the same data

    long_only = packed.batch(0, 64, 32, seed=1, min_doc_tokens=100)[0]
    assert all(int(row[0]) // 10 == 3 for row in long_only if row[0])
    uniform = packed.batch(0, 4, 8, seed=1)
    assert torch.equal(uniform[0], packed.batches(4, 8, seed=1).__next__()[0])  # no schedule: as before
    with pytest.raises(UserError, match="mixture group 'code' has no documents"):
        packed.batch(0, 4, 8, seed=1, mixture={"code": 1.0})
    with pytest.raises(UserError, match="last phase must end at until: 1.0"):
        parse_schedule([{"until": 0.5, "mixture": {"general": 1}}], "stages.pretrain.schedule")
    with pytest.raises(UserError, match="until: expected a fraction"):
        parse_schedule([{"until": 2, "mixture": {}}], "stages.pretrain.schedule")


def test_fetch_records_groups_and_tokenize_carries_them(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"general text number {i} " * 5 for i in range(6)), encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n\n".join(f"knowledge fact number {i} " * 5 for i in range(4)), encoding="utf-8")
    ctx = make_ctx(tmp_path, "data-fetch")
    result = run_stage(ctx, {"sources": [{"uri": str(tmp_path / "a.txt")},
                                          {"uri": str(tmp_path / "b.txt"), "group": "knowledge", "weight": 2}]})
    docs = read_jsonl(result.outputs["documents"])
    assert [d["group"] for d in docs] == ["general"] * 6 + ["knowledge"] * 4
    with pytest.raises(UserError, match="group: expected a name"):
        run_stage(ctx, {"sources": [{"uri": str(tmp_path / "a.txt"), "group": "a b"}]})


def test_clean_on_datatrove_local_executor_matches_the_local_engine(tmp_path):
    english, chinese = distinct_docs()
    words = english[7].split()
    words[len(words) // 2] = "zebra"
    texts = english + chinese + ["  " + english[3].upper() + " ", " ".join(words), "too short"]
    docs = [{"text": t, "source": "test", "group": "g", "repeat": 1} for t in texts]
    cfg = {"holdout_fraction": 0.1}
    local, _ = run_clean(tmp_path / "local", docs, cfg)
    spread, tracker = run_clean(tmp_path / "datatrove", docs, {**cfg, "engine": "datatrove", "datatrove_tasks": 1})
    for name in ("clean", "heldout"):
        assert read_jsonl(spread.outputs[name]) == read_jsonl(local.outputs[name])
    report = json.loads(Path(spread.outputs["report"]).read_text())
    assert report["steps"]["min_chars"]["removed"] == 1
    assert report["steps"]["minhash_dedup"]["removed"] == 2  # the exact copy and the near copy
    assert tracker.dicts["report.json"] == report


def test_a_recipe_with_every_data_setting_loads(tmp_path, monkeypatch):
    import yaml

    from llm_lifecycle.workflows.runner.recipe import ConfigError, load_recipe

    docs = (Path(refs.__file__).parents[1] / "docs" / "data.md").read_text(encoding="utf-8")
    stages = yaml.safe_load(docs.split("```yaml\n")[1].split("```")[0])["stages"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "model": {"preset": "llama-small"}, "stages": stages}))
    monkeypatch.chdir(tmp_path)  # the example's local source, which must exist when the recipe is read
    (tmp_path / "my-corpus").mkdir()
    (tmp_path / "my-corpus" / "notes.txt").write_text("A paragraph of the user's own corpus.\n")
    recipe = load_recipe(str(path))
    assert recipe.settings("data-clean").rules["min_stop_words"] == 2
    assert recipe.settings("data-clean").quality_rules.c4_bad_content is True
    assert recipe.settings("tokenizer-train").whitespace_runs == 16
    assert recipe.settings("pretrain").schedule[1]["mixture"] == {"general": 0.3, "knowledge": 0.7}
    with pytest.raises(ConfigError, match="stages.pretrain.schedule"):
        load_recipe(str(path), ["pretrain.schedule=3"])
