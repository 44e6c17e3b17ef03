"""The upcycle stage kind: a dense pretraining phase -> upcycle -> an MoE phase continuing it,
as the qwen2-moe-upcycle recipe runs, at toy size."""

from __future__ import annotations

import os

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from llm_lifecycle.models.checkpoint import load_model_dir
from llm_lifecycle.registry.tracking import configure
from llm_lifecycle.workflows.runner.pipeline import plan, run_pipeline
from llm_lifecycle.workflows.runner.recipe import ConfigError, load_recipe, recipe_path
from llm_lifecycle.workflows.runner.stage import SilentProgress

TRAIN = {"batch_size": 4, "seq_len": 32, "lr": 1e-2, "warmup_steps": 1, "log_every": 1}


def tiny_recipe(tmp_path, **upcycle) -> str:
    """qwen2-moe-upcycle as shipped, with a toy model, data and step counts."""
    doc = yaml.safe_load(recipe_path("qwen2-moe-upcycle").read_text())
    doc["model"] = {"preset": "qwen2-small", "dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16,
                    "ffn_dim": 128, "max_seq_len": 32}
    stages = doc["stages"]
    stages["data-fetch"] = {"sources": [{"uri": "builtin:arith/corpus.jsonl.gz", "limit": 600}]}
    stages["data-clean"] = {"rules": False, "minhash_dedup": False, "holdout_fraction": 0.1}
    stages["tokenizer-train"] = {"vocab_size": 300}
    stages["dense"] = {"kind": "pretrain", "steps": 6, **TRAIN}
    stages["upcycle"] = {**stages["upcycle"], **upcycle}
    stages["moe"] = {"kind": "pretrain", "from": ["upcycle"], "steps": 4, **TRAIN}
    path = tmp_path / "qwen2-moe-upcycle.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def run(recipe_file: str, workspace):
    os.environ["LLM_HOME"] = str(workspace)
    try:
        return run_pipeline(load_recipe(recipe_file), workspace, SilentProgress())
    finally:
        os.environ.pop("LLM_HOME", None)


def logits(model_dir: str) -> torch.Tensor:
    model, _ = load_model_dir(model_dir)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(ids).logits


def test_the_shipped_recipe_upcycles_into_qwen2_moe_layout():
    recipe = load_recipe("qwen2-moe-upcycle")
    moe = recipe.instances["moe"].values["model"]
    assert recipe.instances["moe"].sources["model"] == "upcycle"
    assert (moe["family"], moe["n_experts"], moe["n_experts_per_token"], moe["n_shared_experts"]) == ("qwen2_moe", 16, 4, 4)
    assert moe["dim"] == recipe.instances["dense"].values["model"]["dim"] == 128  # the dense model's body, kept


def test_upcycle_mistakes_are_one_line_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="stages.upcycle: preset qwen2-small is dense"):
        load_recipe(tiny_recipe(tmp_path, preset="qwen2-small"))
    with pytest.raises(ConfigError, match="moe_ffn_dim .256. cannot exceed the dense ffn_dim .128."):
        load_recipe(tiny_recipe(tmp_path, moe_ffn_dim=256))


@pytest.mark.slow
def test_dense_upcycle_moe_graph_runs_and_whole_copies_compute_the_dense_model(tmp_path):
    workspace = tmp_path / "llm-runs"
    # As shipped: Qwen2-MoE's fine-grained experts plus a gated shared expert, not the dense function.
    results = run(tiny_recipe(tmp_path), workspace)
    up, moe = results["upcycle"], results["moe"]
    assert up.metrics["exact"] == 0 and up.metrics["max_logit_diff"] > 1e-3
    assert load_model_dir(up.model_dir)[0].cfg.n_experts == 16
    assert load_model_dir(moe.model_dir)[0].cfg.n_experts == 16  # the MoE phase trained the upcycled model on
    assert moe.metrics["heldout_ppl"] < moe.metrics["heldout_ppl_before"]
    assert moe.metrics["heldout_ppl_before"] == pytest.approx(up.metrics["heldout_ppl"], rel=1e-4)
    configure(workspace)
    client = MlflowClient()
    for alias in ("dense", "upcycle", "moe"):
        assert client.get_model_version_by_alias("qwen2-moe-upcycle", alias).tags["llm.stage"] == alias
    runs = client.search_runs([mlflow.get_experiment_by_name("qwen2-moe-upcycle").experiment_id])
    upcycle_run = next(r for r in runs if r.info.run_name == "upcycle")
    assert upcycle_run.data.tags["llm.kind"] == "upcycle" and "heldout_ppl_dense" in upcycle_run.data.metrics

    # Every expert a whole copy, top-2 renormalised, no shared expert: exactly the dense model.
    whole = tiny_recipe(tmp_path, preset=None, n_experts=4, n_experts_per_token=2)
    assert {p.name for p in plan(load_recipe(whole), workspace) if p.will_run} == {"upcycle", "moe"}
    results = run(whole, workspace)
    assert results["upcycle"].metrics["exact"] == 1 and results["upcycle"].metrics["max_logit_diff"] < 1e-4
    torch.testing.assert_close(logits(results["upcycle"].model_dir), logits(results["dense"].model_dir),
                               rtol=0, atol=1e-4)
    upcycled = load_model_dir(results["upcycle"].model_dir)[0].cfg
    assert (upcycled.family, upcycled.n_experts, upcycled.moe_ffn_dim) == ("qwen2_moe", 4, 128)
