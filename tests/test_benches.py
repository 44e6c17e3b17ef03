"""The prepared benchmarks run: the GPU script's code paths at toy size on CPU, and the
pipeline profile's attribution of samples to stages and categories."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).parents[1] / "benches"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_gpu_mfu(tmp_path: Path, *extra: str) -> list[dict]:
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(BENCHES / "gpu_mfu.py"), "--tiny", "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_gpu_mfu_script_trains_and_generates_at_toy_size_on_cpu(tmp_path):
    rows = run_gpu_mfu(tmp_path, "--no-compile")
    assert [r["model"] for r in rows] == ["dense", "moe"]
    assert all(r["train_tokens_per_s"] > 0 and r["generate_tokens_per_s"] > 0 for r in rows)
    assert rows[1]["active_params_m"] < rows[1]["params_m"]  # the MoE row is a MoE
    assert all(r["mfu"] is None for r in rows)  # a CPU has no published peak


@pytest.mark.slow
def test_gpu_mfu_script_compiles_its_fsdp2_blocks_on_cpu(tmp_path):
    rows = run_gpu_mfu(tmp_path)
    assert all(r["train_tokens_per_s"] > 0 for r in rows)


def test_gpu_mfu_script_refuses_full_size_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    done = subprocess.run([sys.executable, str(BENCHES / "gpu_mfu.py")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--tiny" in done.stderr


def frame(name: str, file: str) -> dict:
    return {"name": name, "file": file, "line": 1, "col": None}


def test_pipeline_profile_splits_wall_time_by_stage_and_category():
    profile = load("pipeline_profile")
    frames = [
        frame("<module>", "llm"),                                        # 0
        frame("_find_and_load", "<frozen importlib._bootstrap>"),        # 1
        frame("_run_stage", "/x/workflows/runner/pipeline.py"),          # 2
        frame("run", "/x/workflows/stages/pretrain.py"),                 # 3
        frame("train", "/x/workflows/engine/trainer.py"),               # 4
        frame("log_metrics", "/x/registry/tracking.py"),                 # 5
        frame("log_and_register_model", "/x/registry/tracking.py"),      # 6
        frame("run", "/x/workflows/stages/evaluate.py"),                 # 7
        frame("simple_evaluate", "/v/site-packages/lm_eval/evaluator.py"),  # 8
        frame("generate", "/x/models/generate.py"),                      # 9
        frame("run_pipeline", "/x/workflows/runner/pipeline.py"),        # 10
    ]
    samples = [[0, 1], [0, 1],                 # imports before any stage
               [0, 2, 3, 4], [0, 2, 3, 4], [0, 2, 3, 4, 5],  # pretrain: training, one logging call
               [0, 2, 6],                      # registering pretrain's model: still pretrain's time
               [0, 2, 7, 8], [0, 2, 7, 8, 9],  # eval: evaluation, generation
               [0], [0, 2, 7, 8],              # a truncated stack (py-spy's) stays in the stage
               [0, 10], [0, 10, 2, 3, 4]]      # the runner between stages, then a second pretrain instance
    main_thread = {"samples": samples, "weights": [0.5] * len(samples)}
    helper = {"samples": [[0]], "weights": [0.5]}
    stages, total = profile.summarize({"shared": {"frames": frames}, "profiles": [helper, main_thread]})
    assert total == 6.0
    assert list(stages) == [profile.START, "pretrain", "eval", profile.BETWEEN, "pretrain #2"]
    assert stages[profile.START] == {"start-up (imports)": 1.0}
    assert stages["pretrain"] == {"training": 1.0, "MLflow logging": 1.0}
    assert stages["eval"] == {"evaluation": 1.0, "generation": 0.5, profile.OTHER: 0.5}
    assert stages["pretrain #2"] == {"training": 0.5}
