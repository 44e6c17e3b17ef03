"""Faults around the tracking store: secrets never reach it, runs of dead processes are
closed, and two pipelines writing to one sqlite store at once lose nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from conftest import TINY_OVERRIDES
from llm_lifecycle.cli.app import app
from llm_lifecycle.registry import tracking

SECRETS = {
    "HF_TOKEN": "hf_" + "Qx7" * 12,
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-9f8e7d",
    "MY_SERVICE_SECRET": "zz-service-secret-zz",
}


def _everything_in(workspace) -> bytes:
    """Every byte the workspace holds: the sqlite store (and its journal) and all artifacts."""
    return b"".join(p.read_bytes() for p in sorted(workspace.rglob("*")) if p.is_file())


def test_secrets_never_reach_params_tags_or_artifacts(workspace, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    # Credentials as users paste them: inside a source URL, given through --set.
    source = "https://alice:url-pass-314@example.com/corpus.jsonl"
    result = CliRunner().invoke(app, ["pipeline", "llama-small", "--stages", "data-fetch",
                                      "--set", f"data-fetch.sources=[{{uri: '{source}'}}]"])
    assert result.exit_code == 2, result.output  # the URL is not a supported source: a one-line error
    # And through the tracker API every stage uses.
    tracking.configure(workspace)
    with tracking.start_run("secrets", "stage", {"auth_header": f"Bearer {SECRETS['HF_TOKEN']}"}) as run:
        run.log_params({"hf_token": "tok-param-271828", "db": {"password": "db-pass-161803"}, "train_tokens": 512})
        run.set_tags({"note": f"login with {SECRETS['MY_SERVICE_SECRET']}"})
        run.log_dict({"api_key": "apikey-141421", "nested": [{"token": "tok-in-list-1732"}]}, "report.json")
        run.log_text("connect with password=text-pass-2236\n", "notes.txt")
    mlflow.flush_async_logging()

    stored = _everything_in(workspace)
    leaked = [s for s in [*SECRETS.values(), "url-pass-314", "tok-param-271828", "db-pass-161803", "apikey-141421",
                          "tok-in-list-1732", "text-pass-2236"] if s.encode() in stored]
    assert not leaked, f"secrets found in the store or artifacts: {leaked}"
    logged = MlflowClient().get_run(run.run_id).data
    assert logged.params["hf_token"] == tracking.REDACTED and logged.params["train_tokens"] == "512"
    assert b"[REDACTED]" in stored


def test_planted_secrets_reach_neither_the_store_nor_the_workspace(workspace, tmp_path, monkeypatch):
    """A secret in a data path (metric names, the run's note, the datasets table, result and
    report files, the documents), in a list under a secret-looking name (params, the
    recipe.yaml artifact) and in the environment: none of it is anywhere in mlflow.db or
    the workspace, and the recipe artifact is still the recipe (issue 22)."""
    import yaml

    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    folder = tmp_path / "token=SECRET123"
    folder.mkdir()
    words = "the king said that a small model learns quickly when its data is clean".split()
    with open(folder / "corpus.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(40)) + f" {i}"}) + "\n")
    stages = ["data-fetch", "data-clean", "tokenizer-train"]
    result = CliRunner().invoke(app, ["pipeline", "llama-small", "--stages", ",".join(stages),
                                      *[f"--set={o}" for o in TINY_OVERRIDES],
                                      f"--set=data-fetch.sources=[{{uri: '{folder / 'corpus.jsonl'}'}}]",
                                      "--set=tokenizer-train.special_tokens=[SECRET_TOK_777]"])
    assert result.exit_code == 0, result.output
    mlflow.flush_async_logging()

    files = [p for p in sorted(workspace.rglob("*")) if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "result.json" for p in files)
    leaked = [str(p) for p in files if b"SECRET123" in p.read_bytes() or SECRETS["HF_TOKEN"].encode() in p.read_bytes()]
    assert not leaked, leaked
    # The tokenizer must hold the special token it was asked for; nothing else may.
    leaked = [str(p) for p in files if p.name != "tokenizer.json" and b"SECRET_TOK_777" in p.read_bytes()]
    assert not leaked, leaked

    client = MlflowClient()
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("llama-small").experiment_id])}
    assert any("REDACTED" in key for key in runs["data-fetch"].data.metrics), runs["data-fetch"].data.metrics
    recipe = yaml.safe_load(open(mlflow.artifacts.download_artifacts(run_id=runs["pipeline"].info.run_id,
                                                                     artifact_path="recipe.yaml")))
    assert list(recipe["stages"])[:3] == stages  # still the recipe, in its stage order
    assert recipe["stages"]["tokenizer-train"]["special_tokens"] == [tracking.REDACTED]
    assert recipe["stages"]["pretrain"]["steps"] == 6


def test_redacting_text_never_crosses_a_line():
    assert tracking.redact_text("token: abc123\nnext: kept") == f"token: {tracking.REDACTED}\nnext: kept"
    assert tracking.redact_text("special_tokens:\n- kept") == "special_tokens:\n- kept"


STAGES = ["data-fetch", "data-clean", "tokenizer-train", "tokenize", "pretrain"]


def _pipeline(recipe, workspace, overrides):
    cmd = [sys.executable, "-m", "llm_lifecycle.cli.app", "pipeline", recipe, "--stages", ",".join(STAGES),
           *[f"--set={o}" for o in overrides]]
    return subprocess.Popen(cmd, env={**os.environ, "LLM_HOME": str(workspace)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # two pipelines through pretrain: ~2 min on 2 shared cores, over the default-suite budget
def test_two_pipelines_on_one_sqlite_store_lose_nothing(workspace):
    """Two recipes (two experiments) run at once against one fresh store; afterwards every
    stage run is FINISHED with its params and every metric its result.json reports, every
    per-step metric of pretrain is there, and both models are registered."""
    steps = 12
    overrides = [*TINY_OVERRIDES, f"pretrain.steps={steps}", "pretrain.checkpoint_every=6",
                 "data-fetch.sources=[{uri: 'builtin:corpus', limit: 400}]"]  # small data: seconds per stage
    procs = {r: _pipeline(r, workspace, overrides) for r in ("llama-small", "qwen3-moe-small")}
    deadline = time.time() + 600
    for recipe, proc in procs.items():
        out, err = proc.communicate(timeout=max(1, deadline - time.time()))
        assert proc.returncode == 0, f"{recipe}: {err[-3000:]}"
    tracking.configure(workspace)
    client = MlflowClient()
    for recipe in procs:
        runs = mlflow.search_runs(experiment_names=[recipe], output_format="list")
        by_stage = {r.data.tags["llm.stage"]: r for r in runs}
        assert sorted(by_stage) == sorted(["pipeline", *STAGES]), recipe
        for stage in STAGES:
            run = by_stage[stage]
            assert run.info.status == "FINISHED" and run.data.params, (recipe, stage)
            result = json.loads(next(workspace.glob(f"{recipe}/{stage}/*/result.json")).read_text())
            assert result["run_id"] == run.info.run_id
            for name, value in result["result"]["metrics"].items():  # summary values; some share a per-step name
                logged = [m.value for m in client.get_metric_history(run.info.run_id, name)]
                assert pytest.approx(value) in logged, (recipe, stage, name)
        for metric in ("loss", "lr", "grad_norm"):
            history = client.get_metric_history(by_stage["pretrain"].info.run_id, metric)
            assert sorted(m.step for m in history) == list(range(steps)), (recipe, metric)
        assert client.get_model_version_by_alias(recipe, "pretrain").tags["llm.recipe"] == recipe


def test_a_stage_running_elsewhere_is_not_run_twice(workspace):
    from llm_lifecycle.workflows.runner.pipeline import _stage_lock, plan
    from llm_lifecycle.workflows.runner.recipe import load_recipe

    recipe = load_recipe("llama-small")
    fetch = plan(recipe, workspace)[0]
    with _stage_lock(recipe, fetch):  # as another `llm` process running data-fetch would hold it
        result = CliRunner().invoke(app, ["pipeline", "llama-small", "--stages", "data-fetch"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "being run by another llm process" in errors[0], result.stderr
    assert not (fetch.directory / "documents.jsonl").exists()


HOLD_RECIPE = """
import sys, time
from pathlib import Path
from llm_lifecycle.workflows.runner.recipe_lock import hold_recipe
from llm_lifecycle.workflows.runner.stage import SilentProgress
with hold_recipe(Path(sys.argv[1]), "llama-small", False, SilentProgress()):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold_recipe_elsewhere(workspace, seconds: float) -> subprocess.Popen:
    """Another process that holds the recipe, as a running `llm pipeline llama-small` does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RECIPE, str(workspace), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_recipe_running_elsewhere_is_refused_before_any_run(workspace):
    holder = _hold_recipe_elsewhere(workspace, 60)
    try:
        result = CliRunner().invoke(app, ["pipeline", "llama-small", "--stages", "data-fetch"])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "being run by another llm process" in errors[0], result.stderr
    assert f"pid {holder.pid}" in errors[0] and "--wait" in errors[0]
    assert MlflowClient(tracking.tracking_uri(workspace)).search_runs(  # refused before any run was opened
        [e.experiment_id for e in MlflowClient(tracking.tracking_uri(workspace)).search_experiments()]) == []


def test_wait_queues_behind_the_running_recipe(workspace):
    holder = _hold_recipe_elsewhere(workspace, 600)
    waiting = subprocess.Popen([sys.executable, "-m", "llm_lifecycle.cli.app", "pipeline", "llama-small",
                                "--stages", "data-fetch", "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        said = waiting.stdout.readline()
        assert f"waiting for another llm process (pid {holder.pid}) running recipe llama-small" in said, said
        assert not list(workspace.glob("llama-small/data-fetch/*/result.json"))  # queued, not running
    finally:
        holder.kill()  # the holder dies; the OS drops its lock
        holder.wait()
    out, err = waiting.communicate(timeout=600)
    assert waiting.returncode == 0, err[-3000:]
    assert next(workspace.glob("llama-small/data-fetch/*/result.json")).is_file()


def test_reading_the_environment_survives_a_thread_changing_it(monkeypatch):
    """MLflow's telemetry thread sets and removes _MLFLOW_TELEMETRY_SESSION_ID while a
    pipeline runs; copying os.environ meanwhile once died with a KeyError (issue 22)."""
    import threading

    monkeypatch.setenv("HF_TOKEN", "hf_" + "Zr4" * 10)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            for i in range(50):
                os.environ[f"_CHURN_{i}"] = "x"
            for i in range(50):
                os.environ.pop(f"_CHURN_{i}", None)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for _ in range(3000):
            assert tracking.redact_text("hf_" + "Zr4" * 10) == tracking.REDACTED
    finally:
        stop.set()
        thread.join()
