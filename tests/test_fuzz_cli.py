"""Property tests: whatever recipe YAML or command line a user types, `llm` either accepts it
or answers with one line on stderr and exit code 2 — never a traceback.

The CLI runs in-process (typer's CliRunner) and stops before any training: recipes go
through `pipeline --dry-run` (load, validate, plan, memory estimate), and the training
commands are only given inputs that must be refused. Bad inputs are bad by construction
(each strategy breaks one documented rule), so "exit 2" is asserted, not just allowed.
"""

from __future__ import annotations

import math
import string

import pytest
import typer.main
import typer.testing
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llm_lifecycle.cli.app import app
from llm_lifecycle.workflows import stages as kinds
from llm_lifecycle.workflows.runner.settings import field_help
from llm_lifecycle.workflows.stages.rl import METHODS as RL_METHODS

RUNNER = CliRunner()
STAGE_ORDER = list(kinds.DEFAULT_CHAIN)
# Each stage's settings and their defaults, from the kinds' typed settings classes.
STAGE_DEFAULTS = {k: {row["name"]: row["default"] for row in field_help(kinds.kind(k).settings)} for k in STAGE_ORDER}
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# A valid recipe (the tiny test size) that every generated recipe starts from.
BASE = {
    "name": "fuzz",
    "seed": 0,
    "model": {"preset": "llama-small", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16},
    "stages": {"tokenizer-train": {"vocab_size": 512}, "pretrain": {"steps": 6, "seq_len": 64},
               "extend-context": {"seq_len": 128}},
}


@pytest.fixture(autouse=True, scope="module")
def _build_the_command_once():
    """CliRunner rebuilds the click command from the typer app on every call (~50 ms of
    signature inspection); the `llm` script builds it once per process, so do that here."""
    command = typer.main.get_command(app)
    saved = typer.testing._get_command
    typer.testing._get_command = lambda _app: command
    yield
    typer.testing._get_command = saved


def invoke(args: list[str]):
    result = RUNNER.invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"`llm {' '.join(args)}` raised {result.exception!r}") from result.exception
    return result


def assert_one_line_error(result, args) -> str:
    assert result.exit_code == 2, (args, result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    return lines[0]


# ---------------------------------------------------------------------------------------
# Values that break a documented rule of a setting (docs: the recipe reference).

not_a_number = st.text(min_size=1, max_size=8).filter(lambda t: not _parses_as_float(t))
wrong_container = st.one_of(st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


POSITIVE_INTS = ["steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every",
                 "minhash_num_perm", "min_frequency", "shard_tokens", "eval_windows", "max_examples", "max_pairs",
                 "heldout_pairs", "limit", "max_gen_toks", "calib_windows", "rounds", "prompts_per_round"]
BAD_RANGES = {
    **{k: st.integers(max_value=0) for k in POSITIVE_INTS},
    "seq_len": st.integers(max_value=1),
    "vocab_size": st.integers(max_value=264),
    "warmup_steps": st.integers(max_value=-1),
    "min_chars": st.integers(max_value=-1),
    "workers": st.integers(max_value=-1),
    "objective": st.text(max_size=8).filter(lambda t: t not in ("causal", "glm_blank_infilling")),
    "glm_mask_ratio": st.floats(max_value=0) | st.floats(min_value=0.5),
    "glm_mean_span": st.floats(max_value=0.999),
    "lr": st.floats(max_value=0) | st.just(math.inf),
    "eps": st.floats(max_value=0),
    "grad_clip": st.floats(max_value=0),
    "rope_theta": st.floats(max_value=0),
    "beta": st.floats(max_value=0),
    "weight_decay": st.floats(max_value=-1e-9),
    "sft_weight": st.floats(max_value=-1e-9),
    **{k: st.floats(max_value=-1e-9) | st.just(math.inf) for k in ("reward_model_weight", "correct_reward",
                                                                    "format_reward", "think_reward", "language_reward",
                                                                    "mismatched_pairs")},
    "safety_threshold": st.floats(max_value=-1e-9) | st.floats(min_value=1.0001) | st.just(math.nan),
    "pair_half": st.text(max_size=4).filter(lambda t: t not in ("all", "a", "b")),
    "rm_pooling": st.text(max_size=5).filter(lambda t: t not in ("last", "mean")),
    "heldout_prompts": st.integers(max_value=-1),
    **{k: st.sampled_from(["no-such-folder", "./missing/rm", "~/nope"]) for k in ("reward_model", "safety_model", "judge")},
    "kinds": st.lists(st.just(""), min_size=1, max_size=2) | st.lists(st.just("safety"), min_size=3, max_size=4),
    "kind_prompts": st.just({"unnamed-kind": "Be safe."}) | st.just({"": ""}),
    "min_lr_ratio": st.floats(min_value=1.0001, exclude_min=True) | st.floats(max_value=-1e-9) | st.just(math.nan),
    "beta1": st.floats(min_value=1.0) | st.floats(max_value=-1e-9),
    "beta2": st.floats(min_value=1.0) | st.floats(max_value=-1e-9),
    "minhash_threshold": st.floats(max_value=0) | st.floats(min_value=1.0001),
    "holdout_fraction": st.floats(max_value=0) | st.floats(min_value=1.0),
    "num_fewshot": st.integers(max_value=-1) | not_a_number,
    "precision": st.text(max_size=6).filter(lambda t: t not in ("auto", "fp32", "bf16")),
    "method": st.text(max_size=6).filter(lambda t: t not in (*RL_METHODS, "rtn", "gptq", "awq")),
    "format": st.text(max_size=6).filter(lambda t: t not in ("auto", "hf", "gguf", "safetensors")),
    "bits": st.integers().filter(lambda b: b not in (4, 8)),
    "group_size": st.integers(max_value=-1),
    "calib_windows": st.integers(max_value=0),
    "thinking_budget": st.integers(max_value=-1),
    "data": st.just([]) | st.lists(st.integers(), min_size=1, max_size=2),
    "suites": st.just([]) | st.lists(st.integers(), min_size=1, max_size=2),
    "sources": st.just([]) | st.lists(st.integers(), min_size=1, max_size=2)
    | st.lists(st.fixed_dictionaries({"uri": st.just("builtin:corpus"), "weight": st.floats(max_value=-1e-9)}), min_size=1, max_size=1),
    "eval_lengths": st.text(max_size=5) | st.lists(st.integers(max_value=1) | st.text(max_size=3), min_size=1, max_size=3),
    "rope_scaling": st.text(max_size=5) | st.just({"type": "nope", "factor": 2.0})
    | st.just({"type": "yarn", "factor": 0.5}) | st.just({"factor": 2.0, "unknown": 1}),
}


def bad_value(default):
    """A value of the wrong type for a setting whose default is `default`."""
    if isinstance(default, bool):
        return st.integers() | not_a_number | wrong_container
    if isinstance(default, (int, float)):
        return not_a_number | wrong_container | st.booleans() | (st.floats() if isinstance(default, int) else st.nothing())
    if isinstance(default, str):
        return st.integers() | wrong_container
    if isinstance(default, list):
        return st.integers() | st.text(max_size=4)
    return st.nothing()


@st.composite
def bad_setting(draw):
    """(stage, key, value) with a value that breaks the setting's type or range."""
    stage = draw(st.sampled_from(STAGE_ORDER))
    keys = [k for k in STAGE_DEFAULTS[stage] if k in BAD_RANGES or STAGE_DEFAULTS[stage][k] is not None]
    key = draw(st.sampled_from(sorted(keys)))
    default = STAGE_DEFAULTS[stage][key]
    # Free text is a fine value for these (checked later, when the stage runs).
    free_text = key in ("system_prompt", "data_dir")
    options = [bad_value(default)] if not free_text else [st.integers() | wrong_container]
    if key in BAD_RANGES and not (key == "method" and stage not in ("rl", "quantize")):
        options.append(BAD_RANGES[key])
    return stage, key, draw(st.one_of(options))


identifier = st.text(string.ascii_lowercase + "_-", min_size=1, max_size=10)


@st.composite
def bad_recipe(draw):
    """A recipe document with exactly one kind of mistake in it."""
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    kind = draw(st.sampled_from(["setting", "unknown_key", "unknown_stage", "top_level", "section", "model", "seed",
                                 "cross", "name", "not_mapping"]))
    if kind == "setting":
        stage, key, value = draw(bad_setting())
        doc["stages"].setdefault(stage, {})[key] = value
    elif kind == "unknown_key":
        stage = draw(st.sampled_from(STAGE_ORDER))
        doc["stages"].setdefault(stage, {})[draw(identifier.filter(lambda k: k not in STAGE_DEFAULTS[stage]))] = 1
    elif kind == "unknown_stage":
        doc["stages"][draw(identifier.filter(lambda k: k not in STAGE_DEFAULTS))] = {}
    elif kind == "top_level":
        doc[draw(identifier.filter(lambda k: k not in ("name", "description", "seed", "model", "stages")))] = 1
    elif kind == "section":
        target = draw(st.sampled_from(["stages", "model", *[f"stages.{s}" for s in STAGE_ORDER]]))
        value = draw(st.integers() | st.text(max_size=5).filter(lambda t: t != "") | st.lists(st.integers(), min_size=1, max_size=2))
        if target.startswith("stages."):
            doc["stages"][target.split(".", 1)[1]] = value
        else:
            doc[target] = value
    elif kind == "model":
        mistake = draw(st.sampled_from(["preset", "field", "kv_heads", "negative", "type"]))
        if mistake == "preset":
            doc["model"]["preset"] = draw(identifier.filter(lambda p: p not in ("llama-small", "qwen3-moe-small")))
        elif mistake == "field":
            doc["model"][draw(identifier.filter(lambda k: k not in ("preset", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim")))
                         + "_x"] = 1
        elif mistake == "kv_heads":
            doc["model"]["n_kv_heads"] = 3  # does not divide 4 heads
        elif mistake == "type":  # e.g. dim: 1e20, which YAML 1.1 reads as text
            doc["model"][draw(st.sampled_from(["dim", "n_layers", "n_heads", "ffn_multiple_of", "rope_theta"]))] = draw(
                st.sampled_from(["1e20", "64k", "big"]) | st.booleans() | wrong_container)
        else:
            doc["model"][draw(st.sampled_from(["dim", "n_layers", "n_heads"]))] = draw(st.integers(max_value=0))
    elif kind == "seed":
        doc["seed"] = draw(st.integers(max_value=-1) | st.integers(min_value=2**32) | not_a_number | st.booleans())
    elif kind == "name":  # it names folders and MLflow objects: no paths, no empty names
        doc["name"] = draw(st.sampled_from(["../escape", "a/b", "", ".hidden", "x" * 101]) | st.integers() | wrong_container)
    elif kind == "cross":
        mistake = draw(st.sampled_from(["seq_len", "clean", "dca", "heldout", "unpaid"]))
        sampling = st.sampled_from(["ppo", "grpo", "iterative-dpo"])
        if mistake == "heldout":  # holds out every prompt of the builtin problems (a few thousand)
            doc["stages"]["rl"] = {"method": draw(st.sampled_from(["rs-sft"]) | sampling),
                                   "heldout_prompts": draw(st.integers(10**5, 10**9))}
        elif mistake == "unpaid":  # open-ended chat prompts, no reward model, no rule that pays for them
            doc["stages"]["rl"] = {"method": draw(sampling), "problems": ["builtin:chat/zh_oasst1_rm_zh.json"],
                                   "reward_model_weight": draw(st.floats(0.1, 2.0))}
        elif mistake == "seq_len":
            doc["stages"]["extend-context"]["seq_len"] = draw(st.integers(min_value=2, max_value=64))  # <= pretrain's 64
        elif mistake == "clean":
            doc["stages"]["data-clean"] = {"min_chars": 100, "max_chars": draw(st.integers(min_value=0, max_value=99))}
        else:  # DCA's chunk + window past pretrain's 64, a window wider than the chunk, or one without a chunk
            doc["stages"]["extend-context"].update(draw(
                st.builds(lambda c: {"dca_chunk": c}, st.integers(65, 10**6))
                | st.builds(lambda c, w: {"dca_chunk": c, "dca_local_window": w}, st.integers(1, 64), st.integers(65, 10**6))
                | st.builds(lambda c: {"dca_chunk": c, "dca_local_window": c + 1}, st.integers(1, 31))
                | st.builds(lambda w: {"dca_local_window": w}, st.integers(1, 64))))
    else:
        doc = draw(st.lists(st.integers(), max_size=3) | st.integers() | st.text(max_size=20))
    return doc


# A graph recipe's model stages, to be joined by generated `from:` links.
GRAPH_STAGES = {"phase-1": {"kind": "pretrain"}, "phase-2": {"kind": "pretrain", "from": ["phase-1"]},
                "sft": {}, "rl-a": {"kind": "rl"}, "rl-b": {"kind": "rl"}}


@st.composite
def bad_graph(draw):
    """A graph recipe with one mistake in its links: a cycle, an unknown stage, an input of a
    kind the stage does not take, a port the kind does not have, or a student-less distill."""
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["stages"] = {"data-fetch": {}, "data-clean": {}, "tokenizer-train": {"vocab_size": 512}, "tokenize": {},
                     **yaml.safe_load(yaml.safe_dump(GRAPH_STAGES))}
    names = list(doc["stages"])
    model_stages = ["phase-1", "phase-2", "sft", "rl-a", "rl-b"]
    mistake = draw(st.sampled_from(["cycle", "unknown", "wrong_kind", "bad_port", "distill", "self"]))
    if mistake == "cycle":
        a, b = draw(st.permutations(model_stages[2:]))[:2]
        doc["stages"][a]["from"], doc["stages"][b]["from"] = [b], [a]
    elif mistake == "unknown":
        target = draw(st.sampled_from(model_stages))
        doc["stages"][target]["from"] = [draw(identifier.filter(lambda n: n not in names))]
    elif mistake == "wrong_kind":
        doc["stages"][draw(st.sampled_from(["sft", "rl-a", "rl-b"]))]["from"] = [
            draw(st.sampled_from(["data-fetch", "data-clean", "tokenizer-train", "tokenize"]))]
    elif mistake == "bad_port":
        doc["stages"][draw(st.sampled_from(model_stages))]["from"] = {
            draw(identifier.filter(lambda n: n not in ("model", "tokenizer", "shards"))): "phase-1"}
    elif mistake == "self":
        target = draw(st.sampled_from(model_stages))
        doc["stages"][target]["from"] = [target]
    else:
        doc["stages"]["student"] = {"kind": "distill", "from": {"teacher": draw(st.sampled_from(model_stages))}}
    return doc


@FUZZ
@given(doc=bad_graph())
def test_graph_mistakes_are_one_line_exit_2(recipe_file, doc):
    recipe_file.write_text(yaml.safe_dump(doc, allow_unicode=True))
    args = ["pipeline", str(recipe_file), "--dry-run"]
    assert_one_line_error(invoke(args), args)


@st.composite
def good_recipe(draw):
    """A valid recipe: the base with some settings changed within their documented ranges."""
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    stage = draw(st.sampled_from(["pretrain", "sft", "rl", "extend-context"]))
    changes = draw(st.fixed_dictionaries({}, optional={
        "steps": st.integers(1, 10**6), "batch_size": st.integers(1, 64), "lr": st.floats(1e-7, 1.0),
        "warmup_steps": st.integers(0, 1000), "weight_decay": st.floats(0, 1), "min_lr_ratio": st.floats(0, 1),
        "beta1": st.floats(0, 0.999), "grad_clip": st.floats(0.01, 10), "checkpoint_every": st.integers(1, 1000),
        "keep_checkpoints": st.integers(1, 10), "precision": st.sampled_from(["auto", "fp32", "bf16"]),
        "compile": st.booleans(),
    }))
    if stage == "extend-context":  # DCA within pretrain's 64; LongRoPE with its factors derived
        changes.update(draw(st.fixed_dictionaries({}, optional={
            "dca_chunk": st.integers(1, 64),
            "rope_scaling": st.builds(lambda f: {"type": "longrope", "factor": f}, st.floats(1, 64)),
        })))
    doc["stages"].setdefault(stage, {}).update(changes)
    doc["seed"] = draw(st.integers(0, 2**32 - 1))
    doc["stages"]["tokenizer-train"]["vocab_size"] = draw(st.integers(265, 70000))
    return doc


@pytest.fixture()
def recipe_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_HOME", str(tmp_path / "llm-runs"))
    return tmp_path / "fuzz.yaml"


@FUZZ
@given(doc=bad_recipe())
def test_bad_recipe_yaml_is_one_line_exit_2(recipe_file, doc):
    recipe_file.write_text(yaml.safe_dump(doc, allow_unicode=True))
    args = ["pipeline", str(recipe_file), "--dry-run"]
    assert_one_line_error(invoke(args), args)


@settings(FUZZ, max_examples=50)
@given(text=st.text(max_size=60))
def test_arbitrary_text_as_recipe_never_crashes(recipe_file, text):
    recipe_file.write_text(text)
    args = ["pipeline", str(recipe_file), "--dry-run"]
    assert_one_line_error(invoke(args), args)  # no text without a model section is a recipe


@settings(FUZZ, max_examples=20)
@given(doc=good_recipe())
def test_valid_recipes_are_accepted(recipe_file, doc):
    recipe_file.write_text(yaml.safe_dump(doc))
    result = invoke(["pipeline", str(recipe_file), "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert "memory estimate pretrain" in result.stdout


# ---------------------------------------------------------------------------------------
# Command lines.

override_value = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=6), st.booleans())
stage_name = st.sampled_from(STAGE_ORDER) | identifier


@st.composite
def set_option(draw):
    key = draw(st.sampled_from([f"{s}.{k}" for s in STAGE_ORDER for k in STAGE_DEFAULTS[s]]) | identifier
               | st.builds(lambda a, b: f"{a}.{b}", stage_name, identifier))
    return f"{key}={draw(override_value)}" if draw(st.booleans()) else key


@st.composite
def bad_command(draw):
    """A command line that must be refused before any work starts."""
    recipe = draw(st.sampled_from(["llama-small", "qwen3-moe-small"]))
    kind = draw(st.sampled_from(["unknown_recipe", "unknown_stage", "unknown_option", "bad_set", "missing",
                                 "train_with_bad_set", "bad_type", "out_of_range"]))
    if kind == "unknown_recipe":
        return ["pipeline", draw(identifier.filter(lambda r: r not in ("llama-small", "qwen3-moe-small"))), "--dry-run"]
    if kind == "unknown_stage":
        option = draw(st.sampled_from(["--stages", "--from", "--force"]))
        return ["pipeline", recipe, "--dry-run", option, draw(identifier.filter(lambda s: s not in STAGE_DEFAULTS))]
    if kind == "unknown_option":
        return ["pipeline", recipe, "--" + draw(identifier.filter(lambda o: o not in ("stages", "from", "force", "dry-run", "set", "help", "wait")))]
    if kind == "bad_set":
        key = draw(identifier.filter(lambda k: k not in ("seed", "name", "description")))  # no '=': not KEY=VALUE
        return ["pipeline", recipe, "--dry-run", "--set", draw(st.sampled_from([key, f"{key}.x=1", f"pretrain.{key}_x=1"]))]
    if kind == "missing":
        return draw(st.sampled_from([["pipeline"], ["eval"], ["export"], ["export", "--model", "x"], ["pretrain"],
                                     ["data", "fetch"], ["rl"], ["recipes", "show"]]))
    if kind == "train_with_bad_set":
        command = draw(st.sampled_from([["pretrain"], ["sft"], ["rl"], ["data", "fetch"], ["tokenize"], ["quantize"]]))
        return [*command, "--recipe", recipe, "--set", "pretrain.steps=0"]
    if kind == "out_of_range":  # numbers a command cannot use (issue 22)
        option, bad = draw(st.sampled_from([("--batch-size", st.integers(max_value=0)),
                                            ("--num-fewshot", st.integers(max_value=-1))]))
        port = draw(st.integers(max_value=0) | st.integers(min_value=65536))
        return draw(st.sampled_from([["eval", "--model", "x", option, str(draw(bad))], ["ui", "--port", str(port)],
                                     ["serve", "--model", "x", "--port", str(port)]]))
    return draw(st.sampled_from([["eval", "--model", "x", "--limit", "many"], ["eval", "--batch-size", "1.5"],
                                 ["runs", "list", "--limit", "x"], ["ui", "--port", "http"]]))


@settings(FUZZ, max_examples=200)
@given(args=bad_command())
def test_bad_command_lines_are_one_line_exit_2(recipe_file, args):
    assert_one_line_error(invoke(args), args)


@settings(FUZZ, max_examples=80)
@given(recipe=st.sampled_from(["llama-small", "qwen3-moe-small"]),
       sets=st.lists(set_option(), max_size=3),
       stages=st.none() | st.lists(stage_name, min_size=1, max_size=3).map(",".join),
       from_stage=st.none() | stage_name)
def test_random_pipeline_options_never_crash(recipe_file, recipe, sets, stages, from_stage):
    args = ["pipeline", recipe, "--dry-run", *[a for s in sets for a in ("--set", s)]]
    args += ["--stages", stages] if stages else []
    args += ["--from", from_stage] if from_stage else []
    result = invoke(args)
    if result.exit_code != 0:
        assert_one_line_error(result, args)


# ---------------------------------------------------------------------------------------
# Files (issue 22): recipes that are not UTF-8 or repeat a key, damaged data files and
# damaged model folders.

BASE_TEXT = yaml.safe_dump(BASE, sort_keys=False)


@settings(FUZZ, max_examples=40)
@given(data=st.binary(min_size=1, max_size=40), at=st.integers(0, len(BASE_TEXT)))
def test_recipe_bytes_that_are_not_utf8(recipe_file, data, at):
    text = BASE_TEXT.encode()
    spliced = text[:at] + data + text[at:]
    try:
        spliced.decode("utf-8")
        return  # valid UTF-8: other tests cover text
    except UnicodeDecodeError:
        pass
    recipe_file.write_bytes(spliced)
    args = ["pipeline", str(recipe_file), "--dry-run"]
    assert "not UTF-8 text" in assert_one_line_error(invoke(args), args)


@settings(FUZZ, max_examples=40)
@given(line=st.integers(0, len(BASE_TEXT.splitlines()) - 1))
def test_recipe_lines_given_twice(recipe_file, line):
    """Repeating any line that sets a key (at its place) gives a key twice in one mapping."""
    lines = BASE_TEXT.splitlines()
    if ":" not in lines[line] or lines[line].lstrip().startswith("-"):
        return
    recipe_file.write_text("\n".join([*lines[: line + 1], lines[line], *lines[line + 1 :]]) + "\n")
    args = ["pipeline", str(recipe_file), "--dry-run"]
    assert "duplicate key" in assert_one_line_error(invoke(args), args)


DATA_SUFFIXES = [".jsonl", ".jsonl.gz", ".parquet", ".csv", ".txt"]


@pytest.fixture(scope="module")
def fetch_workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("fetch")


@settings(FUZZ, max_examples=15)
@given(suffix=st.sampled_from(DATA_SUFFIXES), content=st.binary(max_size=300),
       depth=st.sampled_from([0, 0, 200_000]))
def test_damaged_data_files_never_crash(fetch_workspace, monkeypatch, suffix, content, depth):
    """Whatever bytes a data file holds, data-fetch reads its documents or stops in one line."""
    monkeypatch.setenv("LLM_HOME", str(fetch_workspace / "llm-runs"))
    source = fetch_workspace / f"data{suffix}"
    source.write_bytes(b'{"text": ' + b"[" * depth + b"]" * depth + b"}\n" if depth else content)
    args = ["data", "fetch", "-r", "llama-small", "--set", f"data-fetch.sources=[{{uri: '{source}'}}]"]
    result = invoke(args)
    if result.exit_code != 0:
        assert_one_line_error(result, args)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from llm_lifecycle.models.checkpoint import save_model_dir
    from llm_lifecycle.models.config import ModelConfig
    from llm_lifecycle.models.decoder import Decoder

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    return save_model_dir(tmp_path_factory.mktemp("model") / "tiny", Decoder(cfg), None)


@settings(FUZZ, max_examples=30)
@given(part=st.sampled_from(["config.json", "model.safetensors"]), cut=st.floats(0, 0.999),
       garbage=st.binary(max_size=64))
def test_damaged_model_folders_never_crash(recipe_file, tiny_model, part, cut, garbage):
    """A model file cut anywhere, with anything after the cut, is refused in one line."""
    import shutil

    folder = recipe_file.parent / "damaged"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(tiny_model, folder)
    data = (folder / part).read_bytes()
    (folder / part).write_bytes(data[: int(len(data) * cut)] + garbage)
    args = ["chat", "--model", str(folder), "--prompt", "hi"]
    assert_one_line_error(invoke(args), args)
