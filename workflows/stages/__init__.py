"""The stage kinds a recipe can use: one module each, declaring `KIND` (workflows/runner/stage.py).

Adding a kind is its module and one line here (docs/CONTRACTS.md). The order is the
default pipeline's: a recipe that names only kinds runs them in this order.
"""

from __future__ import annotations

import importlib

MODULES = {
    "data-fetch": "data_fetch",
    "data-clean": "data_clean",
    "tokenizer-train": "tokenizer_train",
    "tokenize": "tokenize",
    "pretrain": "pretrain",
    "extend-context": "extend_context",
    "sft": "sft",
    "rl": "rl",
    "eval": "evaluate",
    "quantize": "quantize",
    "export": "export",
    "distill": "distill",
    "upcycle": "upcycle",
}
# The default pipeline: the kinds a recipe that names no other kind runs, in this order.
DEFAULT_CHAIN = ("data-fetch", "data-clean", "tokenizer-train", "tokenize", "pretrain", "extend-context", "sft", "rl",
                 "eval", "quantize", "export")


def kind(name: str):
    """The StageKind registered as `name` (its module is imported on first use: most bring torch)."""
    return importlib.import_module(f"{__name__}.{MODULES[name]}").KIND
