"""Shared fixtures: every test runs offline against its own workspace and MLflow store."""

from __future__ import annotations

import os
import socket
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

import csv  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Tests read only what the package ships (with its licences) or what they generate: a user's
# clone has nothing beside it.
PACKAGE = Path(__file__).resolve().parents[1]
BUILTIN_EVAL = PACKAGE / "evals" / "builtin"

# CI (.ci/run exports CI=1, as CI services do) installs every optional part, so there a test
# whose install is missing fails instead of skipping.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_frees(port: int, timeout: float) -> bool:
    """Whether nothing answers on 127.0.0.1:port within timeout seconds (a server stopped)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return True
        time.sleep(0.5)
    return False


def needs(present: bool, what: str, install: str) -> None:
    """Skip the calling test when `what` is not installed, saying how to install it; fail under CI."""
    if not present:
        message = f"needs {what}, not installed here: {install}"
        if IN_CI:
            pytest.fail(f"{message} (.ci/run installs it)", pytrace=False)
        pytest.skip(message)


# A recipe shrunk to seconds per stage: same code paths as the real pipeline.
TINY_OVERRIDES = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
    "tokenizer-train.vocab_size=512",
    "pretrain.steps=6", "pretrain.batch_size=2", "pretrain.seq_len=64", "pretrain.warmup_steps=2",
    "pretrain.checkpoint_every=3", "pretrain.log_every=1",
    "extend-context.steps=2", "extend-context.seq_len=128", "extend-context.batch_size=2",
    "extend-context.eval_windows=2", "extend-context.warmup_steps=1",
    "sft.steps=2", "sft.batch_size=2", "sft.seq_len=96", "sft.max_examples=40", "sft.heldout_chats=4", "sft.warmup_steps=1",
    "rl.steps=2", "rl.batch_size=2", "rl.seq_len=96", "rl.max_pairs=40", "rl.heldout_pairs=4", "rl.warmup_steps=1",
    "eval.suites=[gsm8k]", "eval.limit=2", "eval.max_gen_toks=8",
    "quantize.eval_windows=2",
]


class ListTracker:
    """A tracker that keeps each log_metrics call as a row, for tests of the training loop."""

    def __init__(self):
        self.rows: list[dict] = []

    def log_metrics(self, metrics, step=None):
        self.rows.append({"step": step, **metrics})

    def set_tags(self, tags):
        pass


@pytest.fixture()
def workspace(tmp_path, monkeypatch) -> Path:
    ws = tmp_path / "llm-runs"
    monkeypatch.setenv("LLM_HOME", str(ws))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return ws


def run_rl_stage(workspace: Path, sets: list[str], inputs: dict[str, dict[str, str]], stage_dir: Path):
    """(StageResult, MLflow run id) of the `arith-grpo` recipe's rl stage with `sets`, run
    directly (real MLflow store, real training) on the given inputs: port -> outputs."""
    import mlflow

    from llm_lifecycle.registry import tracking
    from llm_lifecycle.workflows.runner.recipe import load_recipe
    from llm_lifecycle.workflows.runner.stage import SilentProgress, StageContext, StageResult
    from llm_lifecycle.workflows.stages import rl

    recipe = load_recipe("arith-grpo", sets)
    tracking.configure(workspace)
    with tracking.start_run(recipe.name, "rl", {"llm.stage": "rl"}) as tracker:
        inst = recipe.instances["rl"]
        ctx = StageContext(stage="rl", kind="rl", recipe=recipe, workspace=workspace, stage_dir=stage_dir,
                           inputs={port: StageResult(outputs=out) for port, out in inputs.items()},
                           sources={port: port for port in inputs}, values=inst.upstream, tracker=tracker,
                           progress=SilentProgress(), seed=recipe.seed)
        return rl.run(ctx, inst.settings), mlflow.active_run().info.run_id


def shakespeare(chars: int) -> str:
    """The first `chars` characters of the shipped Tiny Shakespeare excerpt
    (workflows/data/builtin/corpus, public domain), its speeches joined by blank lines as in the play text."""
    path = PACKAGE / "workflows" / "data" / "builtin" / "corpus" / "en_tinyshakespeare.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return "\n\n".join(json.loads(line)["text"] for line in f)[:chars]


def chinese_questions(n: int, seed: int = 0) -> list[dict]:
    """`n` generated four-choice arithmetic questions in Chinese, C-Eval's columns. C-Eval's own
    questions are CC BY-NC-SA and not shipped; lm-eval's tasks read these the same way."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = rng.sample([a + b + d for d in (-11, -10, -2, -1, 1, 2, 10, 11)], 3)
        right = i % 4  # the answer's position cycles through A-D
        options = wrong[:right] + [a + b] + wrong[right:]
        rows.append({"id": i, "question": f"{a}加{b}等于多少？", **dict(zip("ABCD", map(str, options))),
                     "answer": "ABCD"[right], "explanation": f"{a}+{b}={a + b}"})
    return rows


def ceval_subjects() -> list[str]:
    """The C-Eval subjects lm-eval's ceval-valid group runs (52)."""
    import lm_eval.tasks

    task_dir = Path(lm_eval.tasks.__file__).parent / "ceval"
    return sorted(p.stem.removeprefix("ceval-valid_") for p in task_dir.glob("ceval-valid_*.yaml"))


def official_layout(out: Path, gsm8k_test: int, gsm8k_train: int) -> Path:
    """A data folder in the official layouts that `--data-dir` reads, for MMLU, C-Eval and GSM8K.

    MMLU: the shipped dev and val CSVs (evals/builtin, MIT), val copied as `test`. GSM8K: the first
    rows of the shipped test.jsonl and train.jsonl (MIT). C-Eval: generated questions
    (`chinese_questions`) for every subject, as `dev` (with explanations) and `val`.
    """
    shutil.copytree(BUILTIN_EVAL / "mmlu" / "dev", out / "mmlu" / "dev")
    (out / "mmlu" / "test").mkdir(parents=True)
    for f in (BUILTIN_EVAL / "mmlu" / "val").iterdir():
        shutil.copy(f, out / "mmlu" / "test" / f.name.replace("_val.csv", "_test.csv"))
    (out / "gsm8k").mkdir()
    for split, rows in (("test", gsm8k_test), ("train", gsm8k_train)):
        lines = (BUILTIN_EVAL / "gsm8k" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        (out / "gsm8k" / f"{split}.jsonl").write_text("\n".join(lines[:rows]) + "\n", encoding="utf-8")
    for split, columns in (("dev", ["id", "question", "A", "B", "C", "D", "answer", "explanation"]),
                           ("val", ["id", "question", "A", "B", "C", "D", "answer"])):
        (out / "ceval" / split).mkdir(parents=True)
        for n, subject in enumerate(ceval_subjects()):
            with (out / "ceval" / split / f"{subject}_{split}.csv").open("w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(chinese_questions(5, seed=2 * n + (split == "val")))
    return out


class Exploit:
    """Unpickling this runs `touch MARKER`: what a hostile pickle (a checkpoint, a model file) would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_model_folder(folder: Path, texts: list[str], max_seq_len: int) -> Path:
    """A random one-layer model in our checkpoint layout with a byte-level BPE (vocab 300,
    ChatML specials) trained on `texts`: the model the CLI-input tests load."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llm_lifecycle.models.checkpoint import save_model_dir
    from llm_lifecycle.models.config import ModelConfig
    from llm_lifecycle.models.decoder import Decoder

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=max_seq_len)
    return save_model_dir(folder, Decoder(cfg), tok)
