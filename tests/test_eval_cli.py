"""`llm eval` as a user meets it: offline on the official layouts, one-line errors, the MLflow
links between an eval run and the model version it scored, and the ppl/long suites."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import chinese_questions, official_layout, shakespeare, tiny_model_folder

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}


def llm(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_lifecycle.cli.app", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **OFFLINE, **env})


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny model in our checkpoint layout, with a byte-level BPE trained on real text (shipped)."""
    return tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny", [shakespeare(20_000)], 128)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = official_layout(tmp_path_factory.mktemp("data"), gsm8k_test=10, gsm8k_train=20)
    (root / "ppl").mkdir()
    (root / "ppl" / "heldout.txt").write_text(shakespeare(28_000)[20_000:])  # text the tokenizer did not see
    return root


def test_offline_on_the_official_layouts_ceval_mmlu_gsm8k(model_dir, data_dir, tmp_path):
    out = llm("eval", "--model", str(model_dir), "--suite", "ceval", "--suite", "mmlu", "--suite", "gsm8k",
              "--data-dir", str(data_dir), "--limit", "1", "--num-fewshot", "1", "--batch-size", "32",
              env={"LLM_HOME": str(tmp_path / "ws"), "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr[-3000:]
    for task in ("ceval-valid", "mmlu", "mmlu_humanities", "gsm8k"):
        assert f"│ {task} " in out.stdout, out.stdout
    assert "exact_match_flexible-extract" in out.stdout and "exact_match_strict-match" in out.stdout
    assert "MLflow run" in out.stdout


def test_missing_data_and_no_network_is_one_line_exit_2(model_dir, tmp_path, monkeypatch):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: an earlier test's store must not leak in.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = {"LLM_HOME": str(tmp_path / "ws")}
    line = _one_line_error(llm("eval", "--model", str(model_dir), "--suite", "ceval", "--limit", "1", env=env))
    assert "ceval/ceval-exam" in line and "--data-dir" in line
    (tmp_path / "bench" / "mmlu" / "dev").mkdir(parents=True)
    line = _one_line_error(llm("eval", "--model", str(model_dir), "--suite", "ppl", "--suite", "mmlu", "--data-dir",
                               str(tmp_path / "bench"), env=env))
    assert "ppl/*.txt" in line  # the first suite's data is missing; no suite ran
    (tmp_path / "bench" / "ppl").mkdir()
    (tmp_path / "bench" / "ppl" / "heldout.txt").write_text(shakespeare(2000))
    line = _one_line_error(llm("eval", "--model", str(model_dir), "--suite", "ppl", "--suite", "mmlu", "--data-dir",
                               str(tmp_path / "bench"), env=env))
    assert "abstract_algebra_dev.csv" in line
    # The data is checked before an MLflow run is opened: no FAILED eval runs left behind.
    from mlflow import MlflowClient

    from llm_lifecycle.registry import tracking

    tracking.configure(tmp_path / "ws")
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_backend_and_suite_mistakes_are_user_errors(model_dir, workspace):
    from llm_lifecycle.workflows.stages.evaluate import evaluate_model
    from llm_lifecycle.workflows.runner.stage import UserError

    args = dict(data_dir=None, limit=1, num_fewshot=0, batch_size=1)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--backend vllm needs a CUDA GPU"):
            evaluate_model(str(model_dir), ["mmlu"], backend="vllm", **args)
    with pytest.raises(UserError, match="unknown eval suite hellaswag; choose from mmlu, gsm8k, ceval, cmmlu, ppl, long"):
        evaluate_model(str(model_dir), ["hellaswag"], **args)
    with pytest.raises(UserError, match="use --backend ours"):
        evaluate_model(str(model_dir), ["ppl"], backend="hf", **args)


def test_eval_run_and_model_version_point_at_each_other(model_dir, data_dir, workspace):
    from mlflow import MlflowClient

    from llm_lifecycle.registry import tracking
    from llm_lifecycle.workflows.stages.evaluate import evaluate_model

    tracking.configure(workspace)
    with tracking.start_run("tiny", "sft", {"llm.stage": "sft"}) as tracker:
        version = tracking.log_and_register_model(tracker, model_dir, "tiny", ["sft"], {"llm.stage": "sft"})
    outcome = evaluate_model("models:/tiny@sft", ["gsm8k", "ppl"], data_dir=str(data_dir), limit=2, num_fewshot=1,
                             batch_size=4, max_gen_toks=8)
    client = MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.data.tags["llm.model_version_uri"] == f"models:/tiny/{version}" == outcome.model_version_uri
    assert client.get_model_version("tiny", version).tags["llm.eval_run_id"] == outcome.run_id
    for key in ("eval.gsm8k.exact_match_strict-match", "eval.gsm8k.exact_match_flexible-extract", "eval.ppl.ppl"):
        assert run.data.metrics[key] == pytest.approx(outcome.metrics[key])
        assert float(client.get_model_version("tiny", version).tags[key]) == pytest.approx(outcome.metrics[key], rel=1e-5)
    assert run.data.metrics["eval.ppl.ppl"] > 1
    assert run.data.tags["eval.gsm8k.data"] == "local" and "gsm8k" in run.data.tags["eval.gsm8k.versions"]
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "eval/gsm8k")}
    assert artifacts == {"eval/gsm8k/results.json", "eval/gsm8k/subjects.md"}
    results = json.loads(Path(client.download_artifacts(outcome.run_id, "eval/gsm8k/results.json")).read_text())
    assert results["n-samples"]["gsm8k"]["effective"] == 2


def test_cmmlu_from_its_official_layout(model_dir, tmp_path):
    """CMMLU's files (`<split>/<subject>.csv`, header ,Question,A,B,C,D,Answer), filled with
    generated Chinese questions (CMMLU is CC BY-NC 4.0 and not shipped)."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    from llm_lifecycle.evals.harness import LifecycleLM, evaluate_suite, score_rows
    from llm_lifecycle.models.load import load_model

    questions = chinese_questions(5)
    index = TaskManager(include_defaults=False, include_path=[Path(lm_eval.tasks.__file__).parent / "cmmlu"]).task_index
    subjects = [name.removeprefix("cmmlu_") for name in index if name.startswith("cmmlu_")]
    assert len(subjects) == 67
    for split in ("dev", "test"):
        (tmp_path / "cmmlu" / split).mkdir(parents=True)
        for subject in subjects:
            with (tmp_path / "cmmlu" / split / f"{subject}.csv").open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                writer.writerows([i, q["question"], q["A"], q["B"], q["C"], q["D"], q["answer"]]
                                 for i, q in enumerate(questions))
    lm = LifecycleLM(*load_model(model_dir), batch_size=32)
    report = evaluate_suite(lm, "cmmlu", data_dir=tmp_path, limit=1, num_fewshot=1)
    assert len(report.n_samples) == 67 and 0 <= report.metrics["eval.cmmlu.acc"] <= 1
    assert report.data["splits"] == {"eval": "test", "fewshot": "dev"}
    assert score_rows(report)[0]["task"] == "cmmlu"


def test_long_context_probes(model_dir):
    from llm_lifecycle.evals.long_context import context_lengths, long_suite
    from llm_lifecycle.models.load import load_model

    model, tokenizer = load_model(model_dir)
    metrics = long_suite(model, tokenizer, "builtin", max_len=128, trials=2, seed=0, batch_size=4)
    assert context_lengths(1024) == [256, 512, 1024] and context_lengths(300) == [128, 150, 300]
    assert context_lengths(128) == [128]
    assert set(metrics) == {"eval.long.passkey_128", "eval.long.passkey_logprob_128", "eval.long.ppl_128"}
    assert 0 <= metrics["eval.long.passkey_128"] <= 1 and metrics["eval.long.passkey_logprob_128"] < 0
    assert metrics["eval.long.ppl_128"] > 1
