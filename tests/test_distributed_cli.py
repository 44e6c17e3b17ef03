"""The real `llm` commands under torchrun on CPU (gloo, FSDP2): `--nproc 2` on one node, and
`--nnodes 2` as two launcher processes on one machine meeting at 127.0.0.1. Each ends with
the weights one process computes (within float tolerance) and with one set of MLflow runs,
written by rank 0.

The data stages run once, in one process (module fixture); each distributed command then
trains on that workspace, and the one-process reference re-runs the same stage there with
--force, so both start from the same inputs.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_OVERRIDES

RECIPE = "llama-small"
# fp32 on every machine: the comparison is of one process with many, not of bf16 roundings.
EXACT = [f"{stage}.precision=fp32" for stage in ("pretrain", "extend-context", "sft", "rl")]
SETS = [a for o in [*TINY_OVERRIDES, *EXACT] for a in ("--set", o)]


def llm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "llm_lifecycle.cli.app", *args]


def llm_env(ws: Path) -> dict[str, str]:
    env = {**os.environ, "LLM_HOME": str(ws), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def llm(ws: Path, *args: str) -> str:
    done = subprocess.run(llm_command(*args), env=llm_env(ws), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"llm {' '.join(args)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_weights(ws: Path, stage: str) -> dict[str, torch.Tensor]:
    """The weights of the stage's newest completed run."""
    results = sorted((ws / RECIPE / stage).glob("*/result.json"), key=lambda p: p.stat().st_mtime)
    return load_file(results[-1].parent / "model" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-4, f"largest weight difference {worst}"


def runs(ws: Path) -> list[tuple[str, str, str]]:
    """(llm.stage tag, status, run id) of every MLflow run in the store, oldest first."""
    with sqlite3.connect(ws / "mlflow.db") as db:
        return db.execute("SELECT t.value, r.status, r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                          "WHERE t.key = 'llm.stage' ORDER BY r.start_time").fetchall()


def stages_to_run(ws: Path, command_sets: list[str], stages: str | None) -> list[str]:
    """What `llm pipeline --stages STAGES` would run now (the plan --dry-run prints)."""
    from llm_lifecycle.workflows.runner.pipeline import plan
    from llm_lifecycle.workflows.runner.recipe import load_recipe

    recipe = load_recipe(RECIPE, [*TINY_OVERRIDES, *EXACT, *command_sets])
    return [p.name for p in plan(recipe, ws, stages) if p.will_run]


def distributed_then_alone(ws: Path, stage: str, command: list[str], sets: list[str] = (),
                           launchers: int = 1) -> str:
    """Run `command` (distributed; `launchers` copies of it, one per node), check it added
    one pipeline run and one run per stage it ran, all finished; then re-run `stage` in one
    process and compare the weights. Returns the first launcher's output. `command` is a
    stage command (it runs `stage`) or `pipeline` (all stages)."""
    flags = [a for o in sets for a in ("--set", o)]
    expected = sorted(["pipeline", *stages_to_run(ws, list(sets), None if command[0] == "pipeline" else stage)])
    before = runs(ws)
    procs = [subprocess.Popen(llm_command(*command, *SETS, *flags), env=llm_env(ws), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(launchers)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, f"{command}\n{out[-2000:]}\n{err[-4000:]}"
    new = [r for r in runs(ws) if r not in before]
    assert sorted(r[0] for r in new) == expected, new
    assert all(status == "FINISHED" for _, status, _ in new), new
    distributed = stage_weights(ws, stage)
    llm(ws, "pipeline", RECIPE, "--stages", stage, "--force", stage, *SETS, *flags)
    assert_same_weights(distributed, stage_weights(ws, stage))
    return outputs[0][0]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    workspace = tmp_path_factory.mktemp("dist") / "llm-runs"
    llm(workspace, "pipeline", RECIPE, "--stages", "data-fetch,data-clean,tokenizer-train,tokenize", *SETS)
    return workspace


def test_pretrain_nproc_2_matches_one_process(ws):
    out = distributed_then_alone(ws, "pretrain", ["pretrain", "-r", RECIPE, "--nproc", "2"])
    assert out.count("Tracking store:") == 1  # rank 0 alone reports


def test_two_nodes_on_one_machine_match_one_process(ws):
    """Two launchers (`--nnodes 2`, one process each) meet at a c10d rendezvous on
    127.0.0.1 and share the workspace, as nodes share a file system."""
    endpoint = f"127.0.0.1:{free_port()}"
    distributed_then_alone(ws, "pretrain", ["pretrain", "-r", RECIPE, "--nnodes", "2", "--rdzv-endpoint", endpoint],
                           sets=["pretrain.steps=4"], launchers=2)


@pytest.mark.slow
def test_sft_nproc_2_matches_one_process(ws):
    llm(ws, "pipeline", RECIPE, "--stages", "pretrain,extend-context", *SETS)
    distributed_then_alone(ws, "sft", ["sft", "-r", RECIPE, "--nproc", "2"])


@pytest.mark.slow
def test_pipeline_nproc_2_matches_one_process(ws):
    """The rest of the lifecycle under torchrun: rank 0 alone runs evaluation, quantization
    and export while the others wait; every rank trains RL."""
    distributed_then_alone(ws, "rl", ["pipeline", RECIPE, "--nproc", "2"])
