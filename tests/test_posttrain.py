"""Post-training pieces: generated problems, verifiable rewards, advantages, the RL losses,
and every rl method run for two steps through the real stage (real MLflow store, real
training) on a tiny model."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_rl_stage

from llm_lifecycle.workflows.data import arith
from llm_lifecycle.workflows.rl.policy_opt import gae, group_advantages, k3_kl
from llm_lifecycle.workflows.rl.reward_model import pair_accuracy, ranking_loss
from llm_lifecycle.workflows.rl.verifiable import correctness_reward, extract_answer, format_reward

BUILTIN_ARITH = Path(arith.__file__).parent / "builtin" / "arith"


def test_shipped_problems_are_what_the_generator_makes():
    for split, rows in arith.build_splits().items():
        with gzip.open(BUILTIN_ARITH / f"{split}.jsonl.gz", "rt") as f:
            assert [json.loads(line) for line in f] == rows, split


def test_problems_have_right_answers_and_test_questions_are_unseen():
    splits = arith.build_splits()
    test_questions = {p["question"] for p in splits["test"]}
    assert not test_questions & {p["question"] for p in splits["train"]}
    assert not test_questions & {p["prompt"] for p in splits["pairs"]}
    for p in splits["train"][:200]:
        # Every calculator note is right, and the last one is the final answer.
        notes = [n.split("=") for n in p["answer"].split("<<")[1:]]
        for expr, result in ((n[0], n[1].split(">>")[0]) for n in notes):
            assert eval(expr) == int(result)  # noqa: S307 - our own generated arithmetic
        assert extract_answer(p["answer"]) == notes[-1][1].split(">>")[0]
    for pair in splits["pairs"][:50]:
        assert correctness_reward(pair["chosen"], pair["chosen"]) == 1.0
        assert correctness_reward(pair["rejected"], pair["chosen"]) == 0.0


def test_answer_extraction_and_rewards():
    assert extract_answer("so 3+4 = 7\n#### 1,200.") == "1200"
    assert extract_answer("no answer here") is None
    assert correctness_reward("x\n#### 7", "y\n#### 7.0") == 1.0
    assert correctness_reward("x\n#### 8", "y\n#### 7") == 0.0
    assert correctness_reward("7", "#### 7") == 0.0  # the number must follow ####
    assert format_reward("work\n#### 12") == 1.0
    assert format_reward("#### 12 and more text") == 0.0
    assert format_reward("work\n#### twelve") == 0.0


def test_group_advantages_are_relative_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.2, 0.2, 0.2, 0.2])
    adv = group_advantages(rewards, group_size=4)
    assert adv[0] > 0 and (adv[1:4] < 0).all()
    assert torch.allclose(adv[:4].sum(), torch.tensor(0.0), atol=1e-5)
    assert torch.equal(adv[4:], torch.zeros(4))  # all equal: no signal


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.allclose(k3_kl(logp, logp), torch.zeros(3))
    assert (k3_kl(logp, logp + torch.tensor([0.3, -0.4, 1.0])) > 0).all()


def test_gae_with_lambda_one_is_return_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.5, 0.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.8, 0.5, 0.9, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_ranking_loss_margin_and_accuracy():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    loss0, _ = ranking_loss(chosen, rejected, margin=0.0)
    loss1, m = ranking_loss(chosen, rejected, margin=1.0)
    assert loss1 > loss0  # a margin asks for a wider gap
    assert math.isclose(m["rm_accuracy"], 0.75)  # one right, one tie
    assert float(pair_accuracy(torch.tensor([0.0]), torch.tensor([1.0]))) == 0.0


# ---- every method through the real rl stage, two steps each ------------------------------------------


@pytest.fixture(scope="module")
def sft_model_dir(tmp_path_factory):
    from llm_lifecycle.models.checkpoint import save_model_dir
    from llm_lifecycle.models.config import ModelConfig
    from llm_lifecycle.models.decoder import Decoder
    from llm_lifecycle.workflows.data.bpe import train_bpe

    texts = [arith.as_text(p) for p in arith.problems(300, seed=5)]
    tokenizer = train_bpe(texts, vocab_size=300)
    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=tokenizer.get_vocab_size(), dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                ffn_dim=64, max_seq_len=192))
    return save_model_dir(tmp_path_factory.mktemp("sft") / "model", model, tokenizer)


TINY_RL = ["rl.steps=2", "rl.batch_size=2", "rl.group_size=2", "rl.max_new_tokens=8", "rl.warmup_steps=1",
           "rl.max_pairs=8", "rl.heldout_pairs=4", "rl.rs_prompts=4", "rl.eval_n=4", "rl.seq_len=160",
           "rl.ppo_epochs=2", "rl.checkpoint_every=1"]


def _run_rl(workspace, sft_dir, method):
    result, _ = run_rl_stage(workspace, [*TINY_RL, f"rl.method={method}"], {"model": {"model": str(sft_dir)}},
                             workspace / method)
    return result


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_online_methods_train_two_steps_and_report_rewards(workspace, sft_model_dir, method):
    result = _run_rl(workspace, sft_model_dir, method)
    assert (result.model_alias, result.aliases) == (None, [method])  # registered @rl (the stage) and @method
    assert {"heldout_accuracy_before", "heldout_accuracy", "final_loss"} <= result.metrics.keys()
    assert math.isfinite(result.metrics["final_loss"])
    state = torch.load(workspace / method / "checkpoints" / "step-00000002.pt", weights_only=True)
    assert state["step"] == 2
    before = json.loads((Path(sft_model_dir) / "config.json").read_text())["model"]
    saved = json.loads((Path(result.model_dir) / "config.json").read_text())
    assert saved["model"] == before
    # The system prompt the chats were trained under travels with the model, and `llm chat`
    # uses it unless told otherwise ("" for none).
    from llm_lifecycle.workflows.runner.recipe import load_recipe
    from llm_lifecycle.workflows.serving.chat import ChatSession

    trained_with = load_recipe("arith-grpo").instances["rl"].upstream["system_prompt"]
    assert saved["system_prompt"] == trained_with
    assert ChatSession(result.model_dir, None, 0.0, 1.0, 4).messages == [{"role": "system", "content": trained_with}]
    assert ChatSession(result.model_dir, "Be brief.", 0.0, 1.0, 4).messages[0]["content"] == "Be brief."
    assert ChatSession(result.model_dir, "", 0.0, 1.0, 4).messages == []


def test_reward_model_saves_its_head_and_keeps_the_policy(workspace, sft_model_dir):
    from llm_lifecycle.workflows.rl.reward_model import load_reward_model

    result = _run_rl(workspace, sft_model_dir, "rm")
    assert (result.model_alias, result.aliases) == ("rm", []) and result.outputs["model"] == str(sft_model_dir)
    model, _ = load_reward_model(result.model_dir)
    ids = torch.tensor([[1, 5, 6, 7], [1, 5, 6, 8]])
    scores = model(ids, torch.tensor([3, 3]))
    assert scores.shape == (2,) and scores[0] != scores[1]  # the reloaded head reads the last token
    assert {"heldout_before.rm_accuracy", "heldout_after.rm_accuracy"} <= result.metrics.keys()


@pytest.mark.slow  # the default pipeline test already runs DPO end to end
def test_dpo_reports_heldout_margin_before_and_after(workspace, sft_model_dir):
    result = _run_rl(workspace, sft_model_dir, "dpo")
    assert result.metrics["heldout_before.reward_margin"] == 0.0  # policy == reference
    assert "heldout_after.reward_accuracy" in result.metrics


def test_rejection_sampling_with_no_correct_sample_says_so(workspace, sft_model_dir):
    from llm_lifecycle.workflows.runner.stage import UserError

    # An untrained model answers nothing right: a clear error, not an empty fine-tune.
    with pytest.raises(UserError, match="no sampled answer was correct"):
        _run_rl(workspace, sft_model_dir, "rs-sft")


# ---- SFT pieces: packing, LoRA; generation with stop strings -------------------------------------------


@pytest.fixture(scope="module")
def tiny(sft_model_dir):
    from llm_lifecycle.models.checkpoint import load_model_dir

    return load_model_dir(sft_model_dir)


def _chat(tokenizer, p):
    from llm_lifecycle.workflows.data.chat_data import encode_chat

    return encode_chat(tokenizer, [{"role": "user", "content": p["question"]},
                                   {"role": "assistant", "content": p["answer"]}], 160)


def test_packed_rows_compute_what_each_example_computes_alone(tiny):
    from llm_lifecycle.workflows.data.chat_data import PackedSFTBatches, _pad_rows

    model, tokenizer = tiny
    examples = [_chat(tokenizer, p) for p in arith.problems(6, seed=9)]
    data = PackedSFTBatches(examples, batch_size=1, seq_len=400, seed=0, pad_id=0)
    assert len(data.rows) < len(examples)  # several examples share a row
    inputs, targets, positions, mask = data.batch(0)
    packed = model(inputs, position_ids=positions, attn_mask=mask).logits[0]
    start = 0
    for example in data.rows[data._order.indices(0, 1)[0]]:
        x, y = _pad_rows([example], len(example[0]) - 1, 0)
        alone = model(x).logits[0]
        n = x.size(1)
        assert torch.allclose(packed[start : start + n], alone, atol=1e-4)
        assert torch.equal(targets[0, start : start + n], y[0])
        start += n


def test_lora_starts_at_the_base_trains_only_adapters_and_merges_exactly(tiny):
    import copy

    from llm_lifecycle.models.lora import LoRALinear, apply_lora, merge_lora

    base, _ = tiny
    model = copy.deepcopy(base)
    x = torch.randint(3, 100, (2, 12))
    trainable = apply_lora(model, rank=4, alpha=8.0)
    assert trainable and all("lora_" in n for n, _ in trainable)
    assert torch.allclose(model(x).logits, base(x).logits)
    opt = torch.optim.SGD([p for _, p in trainable], lr=0.5)
    model(x).logits.square().mean().backward()
    opt.step()
    adapted = model(x).logits.detach()
    assert not torch.allclose(adapted, base(x).logits)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(base.state_dict())
    assert torch.allclose(model(x).logits, adapted, atol=1e-5)


def test_generate_text_cuts_at_stop_strings(tiny):
    from llm_lifecycle.models.generate import generate_text

    model, tokenizer = tiny
    prompts = ["Question: Tom has", "Answer: Ann"]
    full = generate_text(model, tokenizer, prompts, max_new_tokens=12)
    stop = full[0][2:4]
    cut = generate_text(model, tokenizer, prompts, max_new_tokens=12, stop=[stop])
    assert cut[0] == full[0].split(stop)[0]
    assert cut[1] == full[1].split(stop)[0]


# ---- the demo: accuracy rises after SFT and again after GRPO (minutes of CPU) -------------------------


@pytest.mark.slow
def test_arith_demo_accuracy_rises_after_sft_and_again_after_grpo(workspace):
    from mlflow import MlflowClient

    from llm_lifecycle.registry.tracking import configure
    from llm_lifecycle.workflows.runner.pipeline import run_pipeline
    from llm_lifecycle.workflows.runner.recipe import load_recipe
    from llm_lifecycle.workflows.runner.stage import SilentProgress

    recipe = load_recipe("arith-grpo")
    stages = ["data-fetch", "data-clean", "tokenizer-train", "tokenize", "pretrain", "extend-context", "sft", "rl"]
    results = run_pipeline(recipe, workspace, SilentProgress(), stages=stages)
    pretrained = results["sft"].metrics["heldout_accuracy_before"]
    sft = results["sft"].metrics["heldout_accuracy"]
    grpo = results["rl"].metrics["heldout_accuracy"]
    assert results["rl"].metrics["heldout_accuracy_before"] == sft  # the same model, measured alike
    assert pretrained < sft < grpo, (pretrained, sft, grpo)
    configure(workspace)
    version = MlflowClient().get_model_version_by_alias(recipe.name, "grpo")
    assert version.version == MlflowClient().get_model_version_by_alias(recipe.name, "rl").version


# ---- command line -------------------------------------------------------------------------------------


def _llm(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "llm_lifecycle.cli.app", *args], capture_output=True, text=True,
                          timeout=300)


def test_chat_answers_a_turn_and_rl_rejects_unknown_methods(sft_model_dir, workspace):
    out = _llm("chat", "--model", str(sft_model_dir), "--prompt", "Tom has 3 apples.", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "model>" in out.stdout
    bad = _llm("rl", "--recipe", "arith-grpo", "--method", "reinforce")
    assert bad.returncode == 2 and "choose one of dpo, rm, ppo, grpo, rs-sft" in bad.stderr
    assert "Traceback" not in bad.stderr
