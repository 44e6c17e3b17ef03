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


def describe_inputs(spec) -> str:
    return ", ".join(f"{p.name} ({p.accepts}{'' if p.required else ', optional'})" for p in spec.inputs) or "nothing"


def settings_reference(names: list[str]) -> str:
    """docs/settings.md: every kind's inputs, output and settings, made from the settings classes."""
    from llm_lifecycle.workflows.runner.settings import field_help

    lines = ["# Stage kinds and their settings", "",
             "Made by `llm recipes kinds --markdown > docs/settings.md` from each kind's settings class;",
             "tests/test_cli_help.py fails when this page and the code disagree.", ""]
    for name in names:
        spec = kind(name)
        lines += [f"## {name}", "", f"Takes {describe_inputs(spec)}; outputs {spec.output or 'nothing later stages take'}.", "",
                  "| setting | type | default | allowed | help |", "|---|---|---|---|---|"]
        for row in field_help(spec.settings):
            cells = [row["name"], row["type"], repr(row["default"]), row["allowed"], row["help"]]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)
