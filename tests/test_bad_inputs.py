"""Inputs a careful user or an attacker hands `llm` (issue 22): each is one line on stderr
and exit code 2, never a traceback; a recipe that cannot fit is refused before any run.

The CLI runs in-process; files are made here: damaged data files, damaged model folders,
benchmark files, a read-only folder and a full disk (small tmpfs mounts where we may mount,
else chmod, else skipped).
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model_folder
from llm_lifecycle.cli.app import app

RECIPE = "name: bad\nmodel: {preset: llama-small, dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, head_dim: 16}\n"


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (args, result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    return lines[0]


def runs_in(workspace: Path) -> int:
    if not (workspace / "mlflow.db").exists():
        return 0
    with sqlite3.connect(workspace / "mlflow.db") as db:
        return db.execute("SELECT count(*) FROM runs").fetchone()[0]


# ---- recipes --------------------------------------------------------------------------


def test_a_recipe_that_is_not_utf8(workspace, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(RECIPE.encode() + "description: caf\xe9\n".encode("latin-1"))
    line = one_line_error(["pipeline", str(path), "--dry-run"])
    assert f"{path}:3: not UTF-8 text (byte 0xe9)" in line


@pytest.mark.parametrize("text, key, first", [
    (RECIPE + "model: {preset: qwen3-moe-small}\n", "'model'", 2),
    (RECIPE + "stages:\n  pretrain: {steps: 3}\n  pretrain: {steps: 4}\n", "'pretrain'", 4),
    (RECIPE + "stages:\n  pretrain: {steps: 3, lr: 0.1, steps: 4}\n", "'steps'", 4),
])
def test_a_key_given_twice_in_a_recipe(workspace, tmp_path, text, key, first):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    line = one_line_error(["pipeline", str(path), "--dry-run"])
    assert f"duplicate key {key} (first at line {first})" in line


@pytest.mark.parametrize("setting, says", [
    ("model.dim=1e20", "dim must be int, got '1e20'"),
    ("model.rope_theta=fast", "rope_theta must be a number"),
    ("extend-context.eval_lengths=abc", "stages.extend-context.eval_lengths: expected"),
    ("extend-context.eval_lengths=[1024, 1]", "stages.extend-context.eval_lengths: expected"),
    ("extend-context.dca_chunk=0", "stages.extend-context.dca_chunk: expected an integer >= 1, got 0"),
    ("extend-context.dca_chunk=4096", "stages.extend-context.dca_chunk + dca_local_window (4096) must not exceed the "
                                      "length its model was trained at"),
    ("extend-context.dca_local_window=16", "dca_local_window needs dca_chunk"),
    ("extend-context.rope_scaling={type: longrope, factor: 2, short_factor: [1.0]}",
     "stages.extend-context.rope_scaling: give both short_factor and long_factor, or neither"),
])
def test_settings_of_the_wrong_kind(workspace, setting, says):
    assert says in one_line_error(["pipeline", "llama-small", "--dry-run", "--set", setting])


@pytest.mark.parametrize("setting, says", [
    ("rl.rounds=0", "stages.rl.rounds: expected an integer >= 1, got 0"),
    ("rl.prompts_per_round=-3", "stages.rl.prompts_per_round: expected an integer >= 1, got -3"),
    ("rl.heldout_prompts=100000", "stages.rl.heldout_prompts: 100000 holds out every prompt of the `problems` files"),
])
def test_bad_iterative_dpo_settings_are_refused_before_any_run(workspace, setting, says):
    line = one_line_error(["pipeline", "llama-small", "--set", "rl.method=iterative-dpo", "--set", setting])
    assert says in line, line
    assert runs_in(workspace) == 0


@pytest.mark.parametrize("setting, says", [
    ("rl.reward_model=./no-such-rm", "stages.rl.reward_model: './no-such-rm' is not a folder; give models:/NAME@ALIAS"),
    ("rl.judge=missing", "stages.rl.judge: 'missing' is not a folder"),
    ("rl.kinds=[safety]", "stages.rl.kinds: 1 kinds for 2 data files; give one per file"),
    ("rl.kinds=['', b]", "stages.rl.kinds: expected a list of non-empty names"),
    ("rl.kind_prompts={safety: Be safe.}", "stages.rl.kind_prompts: 'safety' is not among kinds []"),
    ("rl.safety_threshold=2", "stages.rl.safety_threshold: expected a number from 0 to 1"),
    ("rl.think_reward=-1", "stages.rl.think_reward: expected a finite number >= 0"),
    ("rl.pair_half=c", "stages.rl.pair_half: 'c' is not available; choose one of all, a, b"),
    ("rl.heldout_prompts=-1", "stages.rl.heldout_prompts: expected an integer >= 0, got -1"),
    ("rl.reward_model_weight=-0.5", "stages.rl.reward_model_weight: expected a finite number >= 0, got -0.5"),
])
def test_reward_settings_out_of_range_before_any_run(workspace, setting, says):
    assert says in one_line_error(["pipeline", "llama-small", "--set", setting])
    assert runs_in(workspace) == 0


@pytest.mark.parametrize("setting, says", [
    ("sft.data=[/no/such/chats.jsonl]", "stages.sft.data: data file not found: /no/such/chats.jsonl"),
    ("sft.data=[builtin:../../../../etc/passwd]", "stages.sft.data: unknown built-in data 'builtin:../../../../etc/passwd'"),
    ("sft.eval_data=missing.jsonl", "stages.sft.eval_data: data file not found: missing.jsonl"),
    ("rl.problems=[builtin:arith/nope.jsonl.gz]", "stages.rl.problems: unknown built-in data 'builtin:arith/nope.jsonl.gz'"),
    ("rl.data=[/no/pairs.jsonl]", "stages.rl.data: data file not found: /no/pairs.jsonl"),
    ("data-fetch.sources=[{uri: /no/corpus}]", "stages.data-fetch.sources[0].uri: no such file or folder: /no/corpus"),
    ("eval.data_dir=/no/benchmarks", "stages.eval.data_dir: /no/benchmarks is not a folder"),
])
def test_data_a_setting_names_must_exist_before_any_run(workspace, setting, says):
    """Even with --dry-run: a missing file is found when the recipe is read, not when its stage opens."""
    assert says in one_line_error(["pipeline", "llama-small", "--dry-run", "--set", setting])
    assert says in one_line_error(["pipeline", "llama-small", "--set", setting])
    assert runs_in(workspace) == 0


@pytest.mark.parametrize("setting", ["pretrain.batch_size=1000000000", "model.dim=100000000000000000000"])
def test_what_cannot_fit_in_memory_is_refused_before_any_run(workspace, setting):
    line = one_line_error(["pipeline", "llama-small", "--set", setting])
    assert "pretrain: needs about" in line and "RAM is available" in line, line
    assert runs_in(workspace) == 0 and not (workspace / "llama-small").exists()


# ---- data files -----------------------------------------------------------------------


def _fetch(source: Path) -> list[str]:
    return ["data", "fetch", "-r", "llama-small", "--set", f"data-fetch.sources=[{{uri: '{source}'}}]"]


@pytest.mark.parametrize("name, content, says", [
    ("garbage.jsonl.gz", os.urandom(300), "not a readable gzip file"),
    ("cut.jsonl.gz", gzip.compress(b'{"text": "hello world"}\n' * 200)[:60], "not a readable gzip file"),
    ("garbage.parquet", os.urandom(300), "not a readable Parquet file"),
    ("empty.parquet", b"", "not a readable Parquet file (Parquet file size is 0 bytes)"),
    ("deep.jsonl", b'{"text": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n", "deep.jsonl:1: JSON nested too deeply"),
])
def test_damaged_data_files(workspace, tmp_path, name, content, says):
    source = tmp_path / name
    source.write_bytes(content)
    line = one_line_error(_fetch(source))
    assert f"{source}" in line and says in line, line


def test_a_csv_field_over_128_kib_is_a_document(workspace, tmp_path):
    source = tmp_path / "long.csv"
    source.write_text("text\n" + "word " * 40_000 + "\n", encoding="utf-8")  # 200 KB in one field
    result = CliRunner().invoke(app, _fetch(source))
    assert result.exit_code == 0, result.output
    docs = next(workspace.glob("llama-small/data-fetch/*/documents.jsonl")).read_text().splitlines()
    assert len(json.loads(docs[0])["text"]) > 128 * 1024


# ---- model folders --------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny model with a byte-level BPE tokenizer."""
    return tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny", ["What is 1+1? The answer is 2."] * 20, 256)


def test_eval_of_a_model_without_its_tokenizer(workspace, model_dir, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((model_dir / name).read_bytes())
    assert "no tokenizer.json beside the weights" in one_line_error(["eval", "--model", str(folder), "--suite", "ppl"])


def _damaged_copy(model_dir: Path, tmp_path: Path, damage: str) -> Path:
    folder = tmp_path / damage
    folder.mkdir()
    (folder / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    weights = (model_dir / "model.safetensors").read_bytes()
    if damage == "truncated":
        (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    elif damage == "pickle":
        torch.save({"w": torch.zeros(2)}, folder / "model.safetensors")
    elif damage == "malformed-config":
        (folder / "config.json").write_text('{"format": "llm-lifecycle", "model": ')
        (folder / "model.safetensors").write_bytes(weights)
    elif damage == "hf-no-weights":
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    return folder


@pytest.mark.parametrize("damage, says", [
    ("no-weights", "config.json but no weights"),
    ("hf-no-weights", "config.json but no weights"),
    ("truncated", "not a readable safetensors file (Error while deserializing header: incomplete metadata"),
    ("pickle", "not a readable safetensors file"),
    ("malformed-config", "config.json: not valid JSON"),
])
def test_damaged_model_folders(workspace, model_dir, tmp_path, damage, says):
    folder = _damaged_copy(model_dir, tmp_path, damage)
    for command in (["chat", "--model", str(folder), "--prompt", "hi"],
                    ["export", "--model", str(folder), "--out", str(tmp_path / "out")]):
        assert says in one_line_error(command)
    assert not (tmp_path / "out").exists()


# ---- eval -----------------------------------------------------------------------------


@pytest.mark.parametrize("option", [["--batch-size", "0"], ["--num-fewshot", "-1"]])
def test_eval_options_out_of_range(workspace, option):
    assert option[0] in one_line_error(["eval", "--model", "x", *option])


# ---- thinking modes (Qwen3) -----------------------------------------------------------------


@pytest.mark.parametrize("args, says", [
    (["chat", "--model", "x", "--thinking-budget", "-1"], "llm chat --thinking-budget -1: must be >= 0"),
    (["eval", "--model", "x", "--thinking-budget", "-3"], "llm eval: --thinking-budget must be >= 0"),
    (["eval", "--model", "x", "--no-think"], "--think/--no-think end a chat turn; add --apply-chat-template"),
    (["pipeline", "llama-small", "--dry-run", "--set", "rl.thinking_budget=-1"], "stages.rl.thinking_budget"),
    (["pipeline", "llama-small", "--dry-run", "--set", "eval.thinking_budget=-2"], "stages.eval.thinking_budget"),
    (["pipeline", "llama-small", "--dry-run", "--set", "sft.eval_thinking=maybe"], "stages.sft.eval_thinking"),
    (["pipeline", "llama-small", "--dry-run", "--set", "sft.eval_thinking=true"],
     "stages.sft.eval_thinking: needs eval_data"),
])
def test_bad_thinking_settings(workspace, args, says):
    assert says in one_line_error(args)
    assert runs_in(workspace) == 0


NO_THINK_TOKENS = "needs a tokenizer with <think> and </think> tokens, and this one has none; use a model whose"


@pytest.mark.parametrize("command, where", [
    (["chat", "--prompt", "hi", "--thinking-budget", "8", "--model"], "llm chat --thinking-budget"),
    (["eval", "--suite", "gsm8k", "--limit", "1", "--thinking-budget", "8", "--model"], "llm eval --thinking-budget"),
    (["rl", "--recipe", "arith-grpo", "--set", "rl.thinking_budget=8", "--from"], "stages.rl.thinking_budget"),
    (["rl", "--recipe", "arith-grpo", "--set", "rl.method=iterative-dpo", "--set", "rl.thinking_budget=8", "--from"],
     "stages.rl.thinking_budget"),
])
def test_a_thinking_budget_for_a_model_without_think_tokens(workspace, model_dir, command, where):
    line = one_line_error([*command, str(model_dir)])
    assert f"{where}: {model_dir}: a thinking budget {NO_THINK_TOKENS}" in line, line
    assert runs_in(workspace) == 0


@pytest.mark.parametrize("key", ["reward_model", "judge"])
def test_a_policy_given_as_a_reward_model_is_refused_before_any_run(workspace, model_dir, key):
    line = one_line_error(["rl", "--recipe", "arith-grpo", "--from", str(model_dir), "--set", f"rl.{key}={model_dir}"])
    assert f"stages.rl.{key}: {model_dir} is a model but not a reward model (no reward_head" in line, line
    assert runs_in(workspace) == 0


def run_names(workspace: Path) -> list[str]:
    with sqlite3.connect(workspace / "mlflow.db") as db:
        return [name for (name,) in db.execute("SELECT name FROM runs ORDER BY start_time")]


@pytest.mark.slow  # five small stages, then three refusals (~25 s of CPU)
def test_a_thinking_budget_is_refused_before_the_stage_run_when_the_model_comes_from_the_graph(workspace, model_dir,
                                                                                              tmp_path):
    """The model an rl or eval stage takes is made in the same graph: refused once it exists, before the
    stage's run opens (in the pipeline that made it) or before any run (when it was made earlier)."""
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"Note {i}: {i} plus one is {i + 1}. " * 4}) + "\n" for i in range(64)))
    recipe = tmp_path / "budget.yaml"
    recipe.write_text(f"""name: budget
model: {{preset: llama-small, dim: 32, n_layers: 1, n_heads: 4, n_kv_heads: 2, ffn_dim: 64, max_seq_len: 256}}
stages:
  data-fetch: {{sources: [{{uri: {text}}}]}}
  data-clean: {{rules: false, minhash_dedup: false}}
  tokenizer-train: {{vocab_size: 300}}
  tokenize: {{}}
  sft: {{init: {model_dir}, data: [builtin:arith/train.jsonl.gz], steps: 1, batch_size: 2, seq_len: 160,
        heldout_chats: 4, warmup_steps: 0}}
  rl: {{method: grpo, thinking_budget: 4, seq_len: 160, max_new_tokens: 8}}
  eval: {{from: [sft, tokenize], thinking_budget: 4}}
""")
    line = one_line_error(["pipeline", str(recipe)])
    assert f"stages.rl.thinking_budget: {workspace / 'budget' / 'sft'}" in line and NO_THINK_TOKENS in line, line
    made = run_names(workspace)
    assert "sft" in made and "rl" not in made  # sft ran; rl was refused before its run opened
    for command in (["pipeline", str(recipe), "--stages", "eval"], ["rl", "--recipe", str(recipe)]):
        assert NO_THINK_TOKENS in one_line_error(command)
    assert run_names(workspace) == made  # sft's model existed: refused before the pipeline's run


# ---- rewards that would pay nothing (issue 19) ---------------------------------------------------


@pytest.mark.parametrize("sets, says", [
    (["--set", "iterative-dpo.from={model: sft, judge: judge-model}"],
     "stages.iterative-dpo.problems: no reward model and no answers to check (open-ended prompts), so every "
     "iterative-dpo reward would be 0; wire a reward model"),
    (["--set", "iterative-dpo.from={model: sft}", "--set", "iterative-dpo.method=grpo"],
     "so every grpo reward would be 0"),
    (["--set", "iterative-dpo.reward_model_weight=0"], "so every iterative-dpo reward would be 0"),
    (["--set", "iterative-dpo.from={model: sft, safety_model: reward-model}"],
     "stages.iterative-dpo.safety_model: Llama 2's rule needs a helpfulness reward model too"),
])
def test_open_ended_prompts_without_a_reward_model_are_refused_with_the_graph(workspace, sets, says):
    line = one_line_error(["pipeline", "qwen2-iterative-dpo", *sets])
    assert says in line, line
    assert runs_in(workspace) == 0


def test_open_ended_prompts_are_rewarded_by_rules_or_a_reward_model_setting(workspace, tmp_path):
    rm = tmp_path / "rm"
    rm.mkdir()
    for sets in (["--set", "iterative-dpo.from={model: sft}", "--set", "iterative-dpo.think_reward=0.5"],
                 ["--set", "iterative-dpo.from={model: sft}", "--set", f"iterative-dpo.reward_model={rm}"]):
        result = CliRunner().invoke(app, ["pipeline", "qwen2-iterative-dpo", "--dry-run", *sets])
        assert result.exit_code == 0, (sets, result.output)


def test_a_gsm8k_file_with_a_broken_line(workspace, model_dir, tmp_path):
    root = tmp_path / "data" / "gsm8k"
    root.mkdir(parents=True)
    good = json.dumps({"question": "1+1?", "answer": "#### 2"})
    (root / "train.jsonl").write_text(good + "\n")
    (root / "test.jsonl").write_text(good + '\n{"question": "2+2?", "answ\n')
    line = one_line_error(["eval", "--model", str(model_dir), "--suite", "gsm8k", "--data-dir", str(root.parent),
                           "--limit", "1", "--num-fewshot", "1"])
    assert f"{root / 'test.jsonl'}:2: not a JSON object" in line


def test_ceval_with_fewer_dev_rows_than_shots(tmp_path):
    from llm_lifecycle.evals.local_data import EvalError, build_mirror

    header = "id,question,A,B,C,D,answer,explanation\n"
    row = "{i},q,a,b,c,d,A,\n"
    for split, rows in (("val", 3), ("dev", 3)):
        (tmp_path / "ceval" / split).mkdir(parents=True)
        (tmp_path / "ceval" / split / f"law_{split}.csv").write_text(header + "".join(row.format(i=i) for i in range(rows)))
    with pytest.raises(EvalError, match="law has 3 rows in its few-shot split 'dev', fewer than the 5 few-shot"):
        build_mirror("ceval", tmp_path, ["law"], tmp_path / "out", fewshot=5)
    assert build_mirror("ceval", tmp_path, ["law"], tmp_path / "out3", fewshot=3).splits["fewshot"] == "dev"


# ---- the machine around it ------------------------------------------------------------


def test_ui_port_out_of_range(workspace):
    assert "--port" in one_line_error(["ui", "--port", "99999"])


def test_llm_home_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "home").write_text("not a folder")
    monkeypatch.setenv("LLM_HOME", str(tmp_path / "home"))
    assert "it is a file, not a folder; point LLM_HOME at a folder you can write" in one_line_error(
        ["pipeline", "llama-small", "--stages", "data-fetch"])


@pytest.fixture()
def small_mounts(tmp_path):
    """mount(folder, options): a 64 KiB tmpfs there (root), or skip where we may not mount."""
    mounted = []

    def mount(folder: Path, options: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=64k,{options}", "tmpfs", str(folder)],
                              capture_output=True)
        if done.returncode != 0:
            if "ro" in options.split(",") and os.geteuid() != 0:
                folder.chmod(0o555)  # read-only for a user that is not root
                return folder
            pytest.skip("needs a tmpfs mount (root)")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_llm_home_read_only(tmp_path, monkeypatch, small_mounts):
    home = small_mounts(tmp_path / "ro-home", "ro")
    monkeypatch.setenv("LLM_HOME", str(home))
    line = one_line_error(["pipeline", "llama-small", "--stages", "data-fetch"])
    assert f"workspace {home} (LLM_HOME" in line and "point LLM_HOME at a folder you can write" in line


def test_export_into_a_read_only_folder(workspace, model_dir, tmp_path, small_mounts):
    folder = small_mounts(tmp_path / "ro", "ro")
    line = one_line_error(["export", "--model", str(model_dir), "--out", str(folder / "out"), "--format", "safetensors"])
    assert f"cannot write {folder / 'out'}" in line


def test_disk_full_during_a_save(workspace, model_dir, tmp_path, small_mounts):
    folder = small_mounts(tmp_path / "full", "rw")
    line = one_line_error(["export", "--model", str(model_dir), "--out", str(folder / "out"), "--format", "safetensors"])
    assert f"no space left on the device writing {folder / 'out'} (64.0 KiB free there)" in line
    assert list(folder.iterdir()) == []  # nothing half-written


def test_a_tracking_server_that_does_not_answer(workspace, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    line = one_line_error(["pipeline", "llama-small", "--stages", "data-fetch"])
    assert time.monotonic() - started < 15, "said so within seconds, not after MLflow's minutes of retries"
    assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}: the tracking server does not answer" in line
    assert not (workspace / "llama-small").exists()
