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
    from llm_lifecycle.workflows.pipeline import _stage_lock, plan
    from llm_lifecycle.workflows.recipe import load_recipe

    recipe = load_recipe("llama-small")
    fetch = plan(recipe, workspace)[0]
    with _stage_lock(recipe, fetch):  # as another `llm` process running data-fetch would hold it
        result = CliRunner().invoke(app, ["pipeline", "llama-small", "--stages", "data-fetch"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "being run by another llm process" in errors[0], result.stderr
    assert not (fetch.directory / "documents.jsonl").exists()


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
