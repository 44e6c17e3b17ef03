"""The whole lifecycle end to end on a shrunken recipe: real training, real MLflow store,
real lm-eval, real transformers export — and caching, resume and the registry."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from conftest import TINY_OVERRIDES, Exploit
from llm_lifecycle.cli.app import app
from llm_lifecycle.registry.catalog import registered_versions
from llm_lifecycle.registry.tracking import configure
from llm_lifecycle.workflows.runner.pipeline import plan, run_pipeline
from llm_lifecycle.workflows.runner.recipe import load_recipe
from llm_lifecycle.workflows.stages import DEFAULT_CHAIN

STAGE_ORDER = list(DEFAULT_CHAIN)
from llm_lifecycle.workflows.runner.stage import SilentProgress

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
    listed = {row["version"]: row["aliases"] for row in registered_versions() if row["name"] == recipe.name}
    assert all(alias in listed[str(v.version)] for alias, v in versions.items()), listed  # `llm models list`
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
    while time.time() < deadline and not list(workspace.glob("llama-small/pretrain/*/checkpoints/step-*.pt")):
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
    assert "int4" in result.aliases and result.metrics["compression"] > 3.5
    configure(ws)
    client = MlflowClient()
    int4, int8 = (client.get_model_version_by_alias(recipe.name, a) for a in ("int4", "int8"))
    assert int4.version != int8.version
    assert mlflow.pyfunc.load_model(f"models:/{recipe.name}@int4").predict(["The king said"])[0] is not None


# ---------------------------------------------------------------------------------------
# SIGKILL at random points: every re-run completes, resumes, and makes the same model.

KILL_STAGES = ["data-fetch", "data-clean", "tokenizer-train", "tokenize", "pretrain", "extend-context", "sft", "rl"]
# CI kills once in each group: the data stages, pretrain, the stages after it.
KILL_GROUPS = [["data-clean", "tokenizer-train", "tokenize"], ["pretrain"], ["extend-context", "sft", "rl"]]


TRAINING_STAGES = ("pretrain", "extend-context", "sft", "rl")


def _kill_points(rng, groups):
    """One (stage, event, extra delay) per group of stages, in pipeline order. Events: the
    stage started, or (training stages) a checkpoint of it appeared."""
    points = []
    for group in groups:
        stage = rng.choice(group)
        event = rng.choice(["started", "checkpoint"]) if stage in TRAINING_STAGES else "started"
        points.append((stage, event, rng.uniform(0.0, 1.5)))
    return points


def _event_seen(ws, recipe, stage, event) -> bool:
    if event == "checkpoint":
        return any(ws.glob(f"{recipe}/{stage}/*/checkpoints/step-*.pt"))
    return any(ws.glob(f"{recipe}/{stage}/*/"))  # the runner made the stage's folder


def _run_with_kills(ws, recipe_name, overrides, stages, points, timeout=900):
    """Run the pipeline CLI, SIGKILLing it at each point in turn; then once more to the end.
    Returns the final CompletedProcess and the kills that landed [(stage, event), ...]."""
    cmd = [sys.executable, "-m", "llm_lifecycle.cli.app", "pipeline", recipe_name, "--stages", ",".join(stages),
           *[f"--set={o}" for o in overrides]]
    env = {**os.environ, "LLM_HOME": str(ws)}
    landed = []
    deadline = time.time() + timeout
    for stage, event, delay in points:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not _event_seen(ws, recipe_name, stage, event) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            landed.append((stage, event))
        proc.wait()
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(60, deadline - time.time()))
    return final, landed


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _check_killed_runs_closed_and_linked(ws, recipe_name):
    configure(ws)
    runs = mlflow.search_runs(experiment_names=[recipe_name], output_format="list")
    statuses = {r.info.run_id: r.info.status for r in runs}
    assert "RUNNING" not in statuses.values(), statuses
    killed_stage_runs = {r.info.run_id for r in runs if r.info.status == "KILLED" and r.data.tags["llm.stage"] != "pipeline"}
    links = {r.data.tags.get("llm.resumes_run") for r in runs}
    assert killed_stage_runs <= links, "a killed stage run is not linked from the run that resumed it"
    return runs


@pytest.mark.slow  # ~4 min on 2 cores: over CI's share; run with -m slow
def test_sigkill_at_random_points_resumes_to_the_same_model(finished, tmp_path):
    """Kills at 3 seeded-random points in 3 stages (one data stage, pretrain, one later training
    stage); the resumed pipeline's final (DPO) model is
    bit-identical to the uninterrupted run's, and MLflow has no run left RUNNING."""
    recipe, ref_ws, results = finished
    ws = tmp_path / "llm-runs"
    points = _kill_points(random.Random(17), KILL_GROUPS)  # tokenize, mid-pretrain, rl after its checkpoint
    final, landed = _run_with_kills(ws, recipe.name, TINY_OVERRIDES, KILL_STAGES, points)
    assert final.returncode == 0, final.stderr[-3000:]
    assert len(landed) >= 2, landed  # the kills happened while the pipeline was running
    reference_dir = Path(results["rl"].outputs["model"])
    resumed_model = _weights(ws / reference_dir.relative_to(ref_ws))  # same recipe: same fingerprints
    reference_model = _weights(reference_dir)
    assert resumed_model.keys() == reference_model.keys()
    for name, tensor in reference_model.items():
        assert torch.equal(resumed_model[name], tensor), name
    runs = _check_killed_runs_closed_and_linked(ws, recipe.name)
    assert sum(r.info.status == "KILLED" for r in runs) >= len(landed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_sweep_over_every_stage(finished, tmp_path, seed):
    """The wide sweep: 6 kill points over all 11 stages (eval, quantize and export too);
    the DPO, int8 and exported Hugging Face weights all equal the uninterrupted run's."""
    recipe, ref_ws, results = finished
    ws = tmp_path / "llm-runs"
    rng = random.Random(seed)
    points = _kill_points(rng, [[s] for s in sorted(rng.sample(STAGE_ORDER, 6), key=STAGE_ORDER.index)])
    final, landed = _run_with_kills(ws, recipe.name, TINY_OVERRIDES, STAGE_ORDER, points)
    assert final.returncode == 0, final.stderr[-3000:]
    for stage, output in (("rl", "model"), ("quantize", "quantized"), ("export", "hf")):
        reference_dir = Path(results[stage].outputs[output])
        ours = _weights(ws / reference_dir.relative_to(ref_ws))  # same recipe: same fingerprints
        reference = _weights(reference_dir)
        assert ours.keys() == reference.keys(), stage
        assert all(torch.equal(ours[k], reference[k]) for k in reference), stage
    _check_killed_runs_closed_and_linked(ws, recipe.name)


# ---------------------------------------------------------------------------------------
# Nothing let in: a pickle that would run code is refused, never executed.


def _one_line_error(result) -> str:
    """The one `error:` line of a failed in-process command (progress bars may precede it)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_crafted_pickle_in_checkpoint_path_is_refused_not_executed(finished, tmp_path):
    recipe, ws, _ = finished
    marker = tmp_path / "code-ran"
    overrides = [*TINY_OVERRIDES, "pretrain.steps=7"]  # a pretrain that has not run: it will look for checkpoints
    stage = next(p for p in plan(load_recipe(recipe.name, overrides), ws) if p.name == "pretrain")
    hostile = stage.directory / "checkpoints" / "step-00000003.pt"
    hostile.parent.mkdir(parents=True)
    torch.save({"step": 3, "model": Exploit(marker)}, hostile)  # a real torch checkpoint file, with a payload
    args = ["pipeline", recipe.name, "--stages", "pretrain", *[f"--set={o}" for o in overrides]]
    line = _one_line_error(CliRunner().invoke(app, args))
    assert not marker.exists(), "the pickle's code ran"
    assert str(hostile) in line and "refused" in line and "not executed" in line


def test_pickled_hf_weights_are_never_opened(finished, tmp_path):
    _, _, results = finished
    marker = tmp_path / "code-ran"
    folder = tmp_path / "hf-from-a-stranger"
    shutil.copytree(results["export"].outputs["hf"], folder)
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump(Exploit(marker), f)
    line = _one_line_error(CliRunner().invoke(app, ["export", "--model", str(folder), "--out", str(tmp_path / "out")]))
    assert not marker.exists(), "the pickle's code ran"
    assert "safetensors" in line and "never opened" in line


def test_trust_remote_code_and_unsafe_loads_are_nowhere_in_the_code():
    root = Path(__file__).resolve().parents[1]
    sources = [p for p in root.rglob("*.py") if "tests" not in p.parts and ".venv" not in p.parts]
    assert len(sources) > 20
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for unsafe in ("trust_remote_code=True", "weights_only=False", "pickle.load", "pickle.loads", "cloudpickle"):
            assert unsafe not in text, f"{path}: {unsafe}"


def test_diverging_loss_stops_keeps_last_good_checkpoint_and_says_what_to_try(finished):
    recipe, ws, _ = finished
    overrides = [*TINY_OVERRIDES, "pretrain.lr=1e4", "pretrain.steps=12", "pretrain.checkpoint_every=1",
                 "pretrain.keep_checkpoints=2"]
    stage = next(p for p in plan(load_recipe(recipe.name, overrides), ws) if p.name == "pretrain")
    result = CliRunner().invoke(app, ["pipeline", recipe.name, "--stages", "pretrain", *[f"--set={o}" for o in overrides]])
    line = _one_line_error(result)
    step = int(line.split("diverged at step ")[1].split(" ")[0])
    kept = sorted(p.name for p in (stage.directory / "checkpoints").iterdir())
    # Checkpoint step-k holds the weights after k updates: the last good one is step-<failing step>,
    # and only the newest keep_checkpoints=2 are on disk, each with its checksum.
    assert kept == [f"step-{k:08d}.pt{suffix}" for k in (step - 1, step) for suffix in ("", ".sha256")], (line, kept)
    assert str(stage.directory / "checkpoints" / f"step-{step:08d}.pt") in line and "--set pretrain.lr=1000" in line
    assert not (stage.directory / "model").exists() and not stage.result_file.exists()
