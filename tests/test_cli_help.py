"""Each stage kind's settings class is the one source of its settings: the commands' --help,
docs/settings.md and the recipe errors are all made from it (issue 18, item 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llm_lifecycle.cli.app import app
from llm_lifecycle.workflows import stages
from llm_lifecycle.workflows.runner.settings import field_help

DOCS = Path(__file__).resolve().parents[1] / "docs" / "settings.md"

# The commands that run one kind on its own (any kind also runs as `llm pipeline R --stages NAME`).
COMMANDS = {
    "data-fetch": ["data", "fetch"], "data-clean": ["data", "clean"], "tokenizer-train": ["tokenizer", "train"],
    "tokenize": ["tokenize"], "pretrain": ["pretrain"], "extend-context": ["extend-context"], "sft": ["sft"],
    "rl": ["rl"], "eval": ["eval"], "quantize": ["quantize"], "export": ["export"], "distill": ["distill"],
}


def test_the_commands_name_registered_kinds():
    assert set(COMMANDS) <= set(stages.MODULES)


@pytest.mark.parametrize("kind", sorted(COMMANDS))
def test_help_lists_every_setting_of_the_kind_with_its_default(kind):
    result = CliRunner().invoke(app, [*COMMANDS[kind], "--help"], terminal_width=400)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # undo rich's line wrapping
    assert f"Settings of a {kind} stage" in text
    for row in field_help(stages.kind(kind).settings):
        assert f"{row['name']} ({row['type']}, default {row['default']!r})" in text, (kind, row["name"])


def test_docs_settings_page_is_made_from_the_settings_classes():
    result = CliRunner().invoke(app, ["recipes", "kinds", "--markdown"])
    assert result.exit_code == 0, result.output
    assert DOCS.read_text() == result.output, "docs/settings.md is stale: llm recipes kinds --markdown > docs/settings.md"


def test_an_integer_limit_is_worded_for_integers(workspace):
    result = CliRunner().invoke(app, ["pipeline", "qwen3-moe-small", "--dry-run", "--set", "sft.lora_rank=-1"])
    assert result.exit_code == 2
    assert "sft.lora_rank: expected an integer >= 0, got -1" in result.stderr
