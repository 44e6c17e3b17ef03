"""The whole lifecycle end to end on a shrunken recipe: real training, real MLflow store,
real lm-eval, real transformers export — and caching, resume and the registry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import TINY_OVERRIDES
from llm_lifecycle.registry.tracking import configure
from llm_lifecycle.workflows.pipeline import plan, run_pipeline
from llm_lifecycle.workflows.recipe import STAGE_ORDER, load_recipe
from llm_lifecycle.workflows.stage import SilentProgress

ALIASES = ("pretrain", "extend-context", "sft", "rl", "int8")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws") / "llm-runs"
    os.environ["LLM_HOME"] = str(ws)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    recipe = load_recipe("qwen3-moe-small", TINY_OVERRIDES)
    results = run_pipeline(recipe, ws, SilentProgress())
    yield recipe, ws, results
    os.environ.pop("LLM_HOME", None)


def test_every_stage_is_a_nested_run_with_hw_tags_params_metrics(finished):
    recipe, ws, results = finished
    assert list(results) == STAGE_ORDER
    configure(ws)
    exp = mlflow.get_experiment_by_name(recipe.name)
    runs = MlflowClient().search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("llm.stage") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1
    assert sorted(r.info.run_name for r in children) == sorted(STAGE_ORDER)
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["hw.cpu_cores"] and run.data.tags["hw.torch"]
        assert run.data.params, run.info.run_name
        assert run.data.metrics, run.info.run_name
    pretrain = next(r for r in children if r.info.run_name == "pretrain")
    assert len(MlflowClient().get_metric_history(pretrain.info.run_id, "loss")) == 6  # per step


def test_registry_has_every_alias_and_pyfunc_generates_text(finished):
    recipe, ws, _ = finished
    configure(ws)
    client = MlflowClient()
    versions = {alias: client.get_model_version_by_alias(recipe.name, alias) for alias in ALIASES}
    assert len({v.version for v in versions.values()}) == len(ALIASES)
    assert versions["sft"].tags["llm.stage"] == "sft" and "hw.cpu" in versions["sft"].tags
    out = mlflow.pyfunc.load_model(f"models:/{recipe.name}@sft").predict(["The king said"])
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)


def test_quantize_and_export_report_what_they_did(finished):
    _, _, results = finished
    assert results["quantize"].metrics["compression"] > 2.5
    assert results["export"].metrics["max_logit_diff"] < 1e-4
    assert "eval.gsm8k.exact_match_strict-match" in results["eval"].metrics


def test_rerun_reuses_every_stage(finished):
    recipe, ws, _ = finished
    assert all(p.cached for p in plan(recipe, ws))
    start = time.perf_counter()
    run_pipeline(recipe, ws, SilentProgress())
    assert time.perf_counter() - start < 30
    changed = load_recipe("qwen3-moe-small", [*TINY_OVERRIDES, "sft.lr=1e-4"])
    status = {p.name: p.cached for p in plan(changed, ws)}
    assert status["extend-context"] and not status["sft"] and not status["export"]


def test_killed_pretrain_resumes_from_checkpoint(workspace):
    args = [f"--set={o}" for o in TINY_OVERRIDES] + ["--set=pretrain.steps=400", "--set=pretrain.checkpoint_every=5"]
    cmd = [sys.executable, "-m", "llm_lifecycle.cli.app", "pipeline", "llama-small", "--stages",
           "data-fetch,data-clean,tokenizer-train,tokenize,pretrain", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list(workspace.glob("llama-small/pretrain/*/checkpoint.pt")):
        time.sleep(0.5)
    assert proc.poll() is None, "pretrain finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming pretrain from step" in out.stdout
    configure(workspace)
    runs = mlflow.search_runs(experiment_names=["llama-small"], filter_string="tags.`llm.stage` = 'pretrain'",
                              output_format="list")
    resumed = [r for r in runs if "llm.resumed_from_step" in r.data.tags]
    assert resumed and int(resumed[0].data.tags["llm.resumed_from_step"]) >= 5


def test_gptq_int4_quantize_registers_the_int4_alias(finished):
    recipe, ws, _ = finished
    gptq = load_recipe("qwen3-moe-small", [*TINY_OVERRIDES, "quantize.method=gptq", "quantize.bits=4",
                                           "quantize.group_size=32", "quantize.calib_windows=4"])
    result = run_pipeline(gptq, ws, SilentProgress(), stages=["quantize"])["quantize"]
    assert result.model_alias == "int4" and result.metrics["compression"] > 3.5
    configure(ws)
    client = MlflowClient()
    int4, int8 = (client.get_model_version_by_alias(recipe.name, a) for a in ("int4", "int8"))
    assert int4.version != int8.version
    assert mlflow.pyfunc.load_model(f"models:/{recipe.name}@int4").predict(["The king said"])[0] is not None
