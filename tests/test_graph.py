"""Recipes as stage graphs: named instances joined by `from:`, each a first-class stage —
its own fingerprint, MLflow run, registry alias and resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from llm_lifecycle.registry.tracking import configure
from llm_lifecycle.workflows.runner.graph import dependents
from llm_lifecycle.workflows.runner.pipeline import plan, run_pipeline
from llm_lifecycle.workflows.runner.recipe import ConfigError, load_recipe
from llm_lifecycle.workflows.runner.stage import SilentProgress

PAIRS = ["builtin:arith/pairs.jsonl.gz"]
RL = {"kind": "rl", "method": "dpo", "data": PAIRS, "max_pairs": 24, "heldout_pairs": 4, "batch_size": 2,
      "seq_len": 160, "log_every": 1}
# Five model stages in a graph: two pretraining phases, SFT, and two RL rounds.
TINY_GRAPH = {
    "name": "tiny-graph",
    "seed": 3,
    "model": {"preset": "llama-small", "dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16,
              "ffn_dim": 64, "max_seq_len": 32},
    "stages": {
        "data-fetch": {"sources": [{"uri": "builtin:arith/corpus.jsonl.gz", "limit": 600}]},
        "data-clean": {"rules": False, "minhash_dedup": False, "holdout_fraction": 0.1},
        "tokenizer-train": {"vocab_size": 300},
        "tokenize": {},
        "general": {"kind": "pretrain", "steps": 4, "batch_size": 4, "seq_len": 32, "lr": 1e-2, "warmup_steps": 1,
                    "log_every": 1},
        "reasoning": {"kind": "pretrain", "from": ["general"], "steps": 4, "batch_size": 4, "seq_len": 32, "lr": 1e-2,
                      "warmup_steps": 1, "log_every": 1},
        "sft": {"data": ["builtin:arith/train.jsonl.gz"], "max_examples": 28, "heldout_chats": 4, "steps": 3, "batch_size": 4,
                "seq_len": 160, "log_every": 1},
        "rl-1": {**RL, "steps": 2},
        "rl-2": {**RL, "steps": 8, "checkpoint_every": 2},
    },
}


def write_recipe(path: Path, doc: dict) -> str:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def llm(*args: str, workspace: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLM_HOME": str(workspace), "COLUMNS": "250"}  # tables unwrapped
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "llm_lifecycle.cli.app", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny graph run once to the end: (recipe file, workspace, results)."""
    root = tmp_path_factory.mktemp("graph")
    recipe_file = write_recipe(root / "tiny-graph.yaml", TINY_GRAPH)
    workspace = root / "llm-runs"
    os.environ["LLM_HOME"] = str(workspace)
    try:
        results = run_pipeline(load_recipe(recipe_file), workspace, SilentProgress())
    finally:
        os.environ.pop("LLM_HOME", None)
    return recipe_file, workspace, results


def test_inputs_follow_from_and_default_to_the_nearest_earlier_stage():
    recipe = load_recipe("deepseek-r1")
    sources = {name: inst.sources for name, inst in recipe.instances.items()}
    assert sources["cold-start"] == {"model": "base"}
    assert sources["reasoning-rl"] == {"model": "cold-start"}  # nearest earlier model
    assert sources["rejection-sft"] == {"teacher": "reasoning-rl", "student": "base"}
    assert sources["student-distill"] == {"teacher": "all-scenarios-rl", "student": "student-base"}
    assert sources["eval"] == {"model": "all-scenarios-rl", "shards": "tokenize"}
    # What flows along the edges: the student's own (smaller) model, the base length.
    assert recipe.instances["student-sft"].upstream["model"]["dim"] == 64
    assert recipe.instances["cold-start"].upstream["model"]["dim"] == 128
    # Today's recipes are the straight line of eleven stages.
    chain = load_recipe("qwen3-moe-small").instances
    assert [(n, i.kind) for n, i in chain.items()][4:8] == [("pretrain", "pretrain"), ("extend-context", "extend-context"),
                                                           ("sft", "sft"), ("rl", "rl")]
    assert chain["quantize"].sources == {"model": "rl", "shards": "tokenize"}


def test_changing_a_stage_changes_exactly_its_fingerprint_and_those_downstream(tmp_path):
    from llm_lifecycle.workflows.runner.pipeline import fingerprints

    base = load_recipe("deepseek-r1")
    edited = load_recipe("deepseek-r1", ["reasoning-rl.lr=2e-5"])
    before, after = fingerprints(base), fingerprints(edited)
    changed = {n for n in before if before[n] != after[n]}
    assert changed == dependents(base.instances, {"reasoning-rl"})
    assert changed == {"reasoning-rl", "rejection-sft", "all-scenarios-rl", "student-distill", "eval", "export"}


def test_editing_a_data_file_changes_the_fingerprints_of_the_stages_that_read_it(tmp_path, monkeypatch):
    """Settings name data by path; a result made from a file's old contents must not be reused."""
    from llm_lifecycle.workflows.runner.pipeline import fingerprints

    monkeypatch.chdir(tmp_path)
    Path("chats.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    recipe = load_recipe("qwen3-moe-small", ["sft.data=[chats.jsonl]"])
    before = fingerprints(recipe)
    assert fingerprints(load_recipe("qwen3-moe-small", ["sft.data=[chats.jsonl]"])) == before  # stable
    with open("chats.jsonl", "a") as f:
        f.write('{"messages": [{"role": "user", "content": "hello"}]}\n')
    after = fingerprints(recipe)
    changed = {n for n in before if before[n] != after[n]}
    assert changed == dependents(recipe.instances, {"sft"})


def test_editing_the_third_model_stage_reruns_it_and_what_depends_on_it_only(tiny, tmp_path):
    recipe_file, workspace, _ = tiny
    again = load_recipe(recipe_file)
    assert all(p.cached for p in plan(again, workspace))  # the same recipe: every stage reused
    edited = load_recipe(recipe_file, ["sft.lr=5e-4"])
    to_run = {p.name for p in plan(edited, workspace) if p.will_run}
    assert to_run == {"sft", "rl-1", "rl-2"}
    os.environ["LLM_HOME"] = str(workspace)
    try:
        run_pipeline(edited, workspace, SilentProgress())
    finally:
        os.environ.pop("LLM_HOME", None)
    configure(workspace)
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("tiny-graph").experiment_id],
                                      order_by=["attributes.start_time DESC"])
    newest_pipeline = next(r for r in runs if r.data.tags.get("llm.stage") == "pipeline")
    ran = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == newest_pipeline.info.run_id}
    assert ran == {"sft", "rl-1", "rl-2"}


def test_each_instance_is_its_own_run_and_registry_alias(tiny):
    recipe_file, workspace, results = tiny
    configure(workspace)
    client = MlflowClient()
    runs = client.search_runs([mlflow.get_experiment_by_name("tiny-graph").experiment_id])
    pipeline = [r for r in runs if r.data.tags.get("llm.stage") == "pipeline"][-1]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == pipeline.info.run_id}
    assert set(children) == set(TINY_GRAPH["stages"])
    assert children["rl-2"].data.tags["llm.kind"] == "rl" and children["rl-2"].data.tags["llm.parent_stage"] == "rl-1"
    assert children["reasoning"].data.tags["llm.parent_stage"] == "general,tokenizer-train,tokenize"
    for alias in ("general", "reasoning", "sft", "rl-1", "rl-2"):
        version = client.get_model_version_by_alias("tiny-graph", alias)
        assert version.tags["llm.stage"] == alias
    # The second pretraining phase continued the first one's model, not fresh weights.
    assert results["reasoning"].metrics["heldout_ppl"] < results["general"].metrics["heldout_ppl"]


@pytest.mark.parametrize("mistake, expected", [
    ({"rl-1": {**RL, "from": ["rl-2"]}, "rl-2": {**RL, "from": ["rl-1"]}}, "cycle"),
    ({"sft": {"from": ["nowhere"]}}, "no stage named 'nowhere'"),
    ({"sft": {"from": ["data-clean"]}}, "'data-clean' (a data-clean stage) gives text, which sft does not take"),
    ({"student": {"kind": "distill", "from": {"teacher": "sft"}}}, "distill needs `from: {student: STAGE}`"),
    ({"odd": {"kind": "pretrian"}}, "unknown stage kind 'pretrian'"),
    ({"odd": {"steps": 3}}, "a stage named after no kind needs `kind:`"),
    ({"ppo": {**RL, "method": "ppo", "from": {"model": "rl-2", "reward_model": "rl-1"}}},
     "stages.ppo.from: reward_model <- rl-1, which makes no reward_model"),
])
def test_graph_mistakes_are_one_line_and_open_no_run(tmp_path, mistake, expected):
    doc = {**TINY_GRAPH, "stages": {**TINY_GRAPH["stages"], **mistake}}
    recipe_file = write_recipe(tmp_path / "bad.yaml", doc)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{")):
        load_recipe(recipe_file)
    out = llm("pipeline", recipe_file, workspace=tmp_path / "ws")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len([line for line in out.stderr.splitlines() if line.strip()]) == 1, out.stderr
    assert not (tmp_path / "ws" / "mlflow.db").exists()


def test_two_stages_with_one_name_are_one_line(tmp_path):
    text = yaml.safe_dump(TINY_GRAPH, sort_keys=False) + "  rl-1:\n    kind: rl\n"
    (tmp_path / "dup.yaml").write_text(text)
    out = llm("pipeline", str(tmp_path / "dup.yaml"), workspace=tmp_path / "ws")
    assert out.returncode == 2 and "duplicate key 'rl-1'" in out.stderr, out.stderr
    assert not (tmp_path / "ws" / "mlflow.db").exists()


def test_dry_run_prints_the_graph(tiny):
    recipe_file, workspace, _ = tiny
    out = llm("pipeline", recipe_file, "--dry-run", workspace=workspace)
    assert out.returncode == 0, out.stderr
    assert "reasoning" in out.stdout and "model <- general" in out.stdout and "cached" in out.stdout


def test_sigkill_in_the_second_rl_stage_resumes_to_the_same_weights(tiny, tmp_path):
    from safetensors.torch import load_file

    recipe_file, reference_ws, results = tiny
    workspace = tmp_path / "llm-runs"
    cmd = [sys.executable, "-m", "llm_lifecycle.cli.app", "pipeline", recipe_file]
    env = {**os.environ, "LLM_HOME": str(workspace)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while proc.poll() is None and not any(workspace.glob("tiny-graph/rl-2/*/checkpoints/step-*.pt")):
        assert time.time() < deadline, "rl-2 never wrote a checkpoint"
        time.sleep(0.05)
    assert proc.poll() is None, "the pipeline finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming" in out.stdout
    reference_dir = Path(results["rl-2"].outputs["model"])
    ours = load_file(str(workspace / reference_dir.relative_to(reference_ws) / "model.safetensors"))
    reference = load_file(str(reference_dir / "model.safetensors"))
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


@pytest.mark.parametrize("uri", ["builtin:../../../../../../etc/passwd", "builtin:chat/../../../refs.py", "builtin:"])
def test_every_data_reference_goes_through_the_guarded_resolver(uri):
    from llm_lifecycle.workflows import refs
    from llm_lifecycle.workflows.runner.stage import UserError

    with pytest.raises(UserError, match="unknown built-in data"):
        refs.data_path(uri, "stages.sft.data")
    assert refs.data_path("builtin:arith/test.jsonl.gz", "stages.sft.data").is_file()
