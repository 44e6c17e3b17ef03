"""Shared fixtures: every test runs offline against its own workspace and MLflow store."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# A recipe shrunk to seconds per stage: same code paths as the real pipeline.
TINY_OVERRIDES = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
    "tokenizer-train.vocab_size=512",
    "pretrain.steps=6", "pretrain.batch_size=2", "pretrain.seq_len=64", "pretrain.warmup_steps=2",
    "pretrain.checkpoint_every=3", "pretrain.log_every=1",
    "extend-context.steps=2", "extend-context.seq_len=128", "extend-context.batch_size=2",
    "extend-context.eval_windows=2", "extend-context.warmup_steps=1",
    "sft.steps=2", "sft.batch_size=2", "sft.seq_len=96", "sft.max_examples=40", "sft.warmup_steps=1",
    "rl.steps=2", "rl.batch_size=2", "rl.seq_len=96", "rl.max_pairs=40", "rl.heldout_pairs=4", "rl.warmup_steps=1",
    "eval.suites=[gsm8k]", "eval.limit=2", "eval.max_gen_toks=8",
    "quantize.eval_windows=2",
]


@pytest.fixture()
def workspace(tmp_path, monkeypatch) -> Path:
    ws = tmp_path / "llm-runs"
    monkeypatch.setenv("LLM_HOME", str(ws))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return ws


class Exploit:
    """Unpickling this runs `touch MARKER`: what a hostile pickle (a checkpoint, a model file) would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
