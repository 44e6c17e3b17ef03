"""Online iterative DPO through the real rl stage on a tiny model: real torch training, real
reward models scoring real samples, the real MLflow sqlite store; a re-run reuses finished rounds."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
from conftest import run_rl_stage

from llm_lifecycle.workflows.rl.iterative_dpo import best_worst_pairs, round_prompts


def test_best_worst_pairs_take_the_extremes_and_drop_ties():
    prompts = [{"messages": [{"role": "user", "content": q}]} for q in "ab"]
    replies = ["a1", "a2", "a3", "b1", "b2", "b3"]
    scores = torch.tensor([0.5, 2.0, -1.0, 1.0, 1.0, 1.0])
    pairs, gaps = best_worst_pairs(prompts, replies, scores, 3)
    assert pairs == [(prompts[0], "a2", "a3")] and gaps.tolist() == [3.0]


def test_rounds_walk_through_the_prompts_and_wrap():
    assert round_prompts(list("abcde"), 0, 3) == list("abc")
    assert round_prompts(list("abcde"), 1, 3) == list("dea")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny chat policy and two reward models (differently initialised heads) on its backbone."""
    from llm_lifecycle.models.checkpoint import save_model_dir
    from llm_lifecycle.models.config import ModelConfig
    from llm_lifecycle.models.decoder import Decoder
    from llm_lifecycle.workflows.data.bpe import train_bpe
    from llm_lifecycle.workflows.rl.reward_model import RewardModel, save_reward_model

    texts = [f"question {i}: how do I bake bread number {i}? Mix flour, water and salt." for i in range(200)]
    tokenizer = train_bpe(texts, vocab_size=300)
    root = tmp_path_factory.mktemp("idpo")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
                      max_seq_len=160)
    policy = Decoder(cfg)
    out = {"sft": save_model_dir(root / "sft", policy, tokenizer)}
    for name, seed in (("rm", 1), ("judge", 2)):
        torch.manual_seed(seed)
        out[name] = save_reward_model(root / name, RewardModel(Decoder(cfg)), tokenizer, extra={"stage": name})
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"How do I bake bread number {i}?", "chosen": "Mix.",
                                           "rejected": "No."}) + "\n" for i in range(12)))
    out["prompts"] = prompts
    return out


TINY = ["rl.method=iterative-dpo", "rl.rounds=2", "rl.steps=2", "rl.batch_size=2", "rl.group_size=3",
        "rl.prompts_per_round=4", "rl.heldout_prompts=3", "rl.max_new_tokens=8", "rl.warmup_steps=1",
        "rl.seq_len=96", "rl.lr=1e-3"]


def _run(workspace, models, stage_dir):
    inputs = {"model": {"model": str(models["sft"])}, "judge": {"reward_model": str(models["judge"])}}
    return run_rl_stage(workspace, [*TINY, f"rl.problems=[{models['prompts']}]", f"rl.reward_model={models['rm']}"],
                        inputs, stage_dir)


@pytest.mark.slow  # ~50 s on the shared 2-core machine
def test_iterative_dpo_logs_each_round_and_resumes_after_the_last_finished_one(workspace, models):
    from llm_lifecycle.models.checkpoint import load_model_dir

    result, run_id = _run(workspace, models, workspace / "idpo")
    assert result.aliases == ["iterative-dpo"]
    m = result.metrics
    assert m["judge_win_rate.round0"] == 0.5  # the SFT model against itself: every prompt a tie
    for r in (1, 2):
        assert 0.0 <= m[f"judge_win_rate.round{r}"] <= 1.0 and m[f"pairs.round{r}"] >= 1
        assert m[f"reward_gap.round{r}"] > 0  # best minus worst of each kept group
    assert m["heldout_prompts"] == 3  # the first 3 of the file, all short enough to measure
    client = mlflow.tracking.MlflowClient()
    steps = [h.step for h in client.get_metric_history(run_id, "round.judge_win_rate")]
    assert steps == [0, 1, 2]
    losses = client.get_metric_history(run_id, "dpo_loss")  # the trainer's steps, round after round
    assert sorted(h.step for h in losses) == [0, 1, 2, 3]
    trained, _ = load_model_dir(result.model_dir)
    sft, _ = load_model_dir(models["sft"])
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), sft.state_dict().values()))

    # A second run in the same folder finds both rounds finished: same weights, same figures.
    again, _ = _run(workspace, models, workspace / "idpo")
    assert again.metrics == {k: v for k, v in m.items() if k in again.metrics}
    reloaded, _ = load_model_dir(again.model_dir)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), reloaded.state_dict().values()))
