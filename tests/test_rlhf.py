"""RLHF with learned rewards: reward-model scoring, the judge, the rule rewards, reward
sources combined, and the rl stage driven by a reward model."""

from __future__ import annotations

import pytest
import torch

from llm_lifecycle.workflows.data import arith


@pytest.fixture(scope="module")
def tiny_rm():
    from llm_lifecycle.models.config import ModelConfig
    from llm_lifecycle.models.decoder import Decoder
    from llm_lifecycle.workflows.data.bpe import train_bpe
    from llm_lifecycle.workflows.rl.reward_model import RewardModel

    tokenizer = train_bpe([arith.as_text(p) for p in arith.problems(200, seed=3)], vocab_size=300)
    torch.manual_seed(0)
    backbone = Decoder(ModelConfig(vocab_size=tokenizer.get_vocab_size(), dim=32, n_layers=2, n_heads=2,
                                   n_kv_heads=1, ffn_dim=64, max_seq_len=64))
    return RewardModel(backbone).eval(), tokenizer


PROMPTS = [[{"role": "user", "content": "What is 2 + 3?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 7 and 8."}],
           [{"role": "user", "content": "How many apples are left?"}]]
REPLIES_A = ["2 + 3 = 5\n#### 5", "15", "She has 4 apples left. " * 20]  # the last is cut to the model's length
REPLIES_B = ["#### 6", "7 + 8 = 15\n#### 15", "none"]


def test_score_replies_reads_the_last_token_of_each_chat_alone_or_batched(tiny_rm):
    from llm_lifecycle.workflows.data.chat_data import encode_reply
    from llm_lifecycle.workflows.rl.reward_model import score_replies

    rm, tokenizer = tiny_rm
    batched = score_replies(rm, tokenizer, PROMPTS, REPLIES_A, "You are a helpful assistant.", batch_size=2)
    for prompt, reply, score in zip(PROMPTS, REPLIES_A, batched):
        ids, _ = encode_reply(tokenizer, prompt, reply, 64, default_system="You are a helpful assistant.")
        alone = rm(torch.tensor([ids]), torch.tensor([len(ids) - 1]))
        assert torch.allclose(alone, score, atol=1e-5)
    other_system = score_replies(rm, tokenizer, PROMPTS, REPLIES_A, "Judge safety.")
    assert other_system[0] != batched[0] and torch.allclose(other_system[1], batched[1], atol=1e-5)  # own system turn kept
    with pytest.raises(ValueError, match="3 prompts but 2 replies"):
        score_replies(rm, tokenizer, PROMPTS, REPLIES_A[:2], None)


def test_mean_pooling_scores_the_mean_over_the_reply_alone_or_batched_and_survives_saving(tiny_rm, tmp_path):
    from llm_lifecycle.workflows.data.chat_data import encode_reply
    from llm_lifecycle.workflows.rl.reward_model import (
        RewardModel,
        load_reward_model,
        save_reward_model,
        score_replies,
    )

    last_rm, tokenizer = tiny_rm
    rm = RewardModel(last_rm.backbone, pooling="mean").eval()
    rm.head.load_state_dict(last_rm.head.state_dict())
    batched = score_replies(rm, tokenizer, PROMPTS, REPLIES_A, "sys", batch_size=2)
    for prompt, reply, score in zip(PROMPTS, REPLIES_A, batched):
        ids, mask = encode_reply(tokenizer, prompt, reply, 64, default_system="sys")
        values = rm.head(rm.backbone(torch.tensor([ids])).hidden)[0]
        assert torch.allclose(values[mask.index(1):].mean(), score, atol=1e-5)  # from the reply's first token on
        assert not torch.allclose(values[-1], score, atol=1e-3)  # not the last token's value
    loaded, _ = load_reward_model(save_reward_model(tmp_path / "rm", rm, tokenizer, extra={}))
    assert loaded.pooling == "mean"
    assert torch.allclose(score_replies(loaded, tokenizer, PROMPTS, REPLIES_A, "sys"), batched, atol=1e-5)
    with pytest.raises(ValueError, match="pooling 'max' is not one of last, mean"):
        RewardModel(rm.backbone, pooling="max")


def test_win_rate_counts_ties_half_and_is_symmetric(tiny_rm):
    from llm_lifecycle.workflows.rl.judge import win_rate

    rm, tokenizer = tiny_rm
    assert win_rate(rm, tokenizer, PROMPTS, REPLIES_A, REPLIES_A, None)["win_rate"] == 0.5
    ab = win_rate(rm, tokenizer, PROMPTS, REPLIES_A, REPLIES_B, None)
    ba = win_rate(rm, tokenizer, PROMPTS, REPLIES_B, REPLIES_A, None)
    assert ab["win_rate"] + ba["win_rate"] == pytest.approx(1.0) and ab["n"] == 3
    assert round(ab["win_rate"] * 3, 4) in (0, 1, 2, 3)  # whole prompts: no ties between different replies


# ---- rule rewards, prompts, reward models combined ---------------------------------------------


def test_r1_format_and_language_rewards():
    from llm_lifecycle.workflows.rl.rewards import language_consistency_reward, think_format_reward

    assert think_format_reward("<think>3 + 4 = 7</think>The answer is 7.") == 1.0
    assert think_format_reward("  <think>\nadd them\n</think>\n7") == 1.0
    assert think_format_reward("<think></think>7") == 0.0  # an empty block thinks nothing
    assert think_format_reward("<think>add them</think>") == 0.0  # no answer after it
    assert think_format_reward("7 <think>add</think> 7") == 0.0  # the block comes first
    assert language_consistency_reward("How many apples?", "Four apples") == 1.0
    assert language_consistency_reward("苹果有几个？", "有四个 apples") == pytest.approx(3 / 4)
    assert language_consistency_reward("How many apples?", "四个 apples") == pytest.approx(1 / 3)
    assert language_consistency_reward("How many?", "42 !") == 0.0


def test_prompts_come_from_problems_preference_pairs_and_conversations():
    from llm_lifecycle.workflows.refs import builtin_path
    from llm_lifecycle.workflows.rl.rewards import load_prompts

    problems = load_prompts(builtin_path("arith/test.jsonl.gz", "test"))
    assert len(problems) == 200 and all(p["answer"] and p["messages"][0]["role"] == "user" for p in problems)
    for name in ("chat/en_hh_rlhf_harmless-base_test.jsonl.gz", "chat/zh_oasst1_rm_zh.json",
                 "chat/en_dolly_hhrlhf_train_small.jsonl"):
        prompts = load_prompts(builtin_path(name, "test"))
        assert len(prompts) > 100 and all(p["answer"] is None and p["messages"][-1]["role"] == "user" for p in prompts)
        assert len({str(p["messages"]) for p in prompts}) == len(prompts)  # each conversation once


def test_llama2_rule_takes_the_safety_score_on_unsafe_prompts_and_below_the_threshold(tiny_rm):
    from llm_lifecycle.workflows.rl.reward_model import RewardModel, score_replies
    from llm_lifecycle.workflows.rl.rewards import Reward, RewardModels, RewardSettings

    helpful, tokenizer = tiny_rm
    torch.manual_seed(1)
    safety = RewardModel(type(helpful.backbone)(helpful.backbone.cfg)).eval()
    prompts = [{"messages": m, "answer": None, "kind": k} for m, k in zip(PROMPTS, ["safety", "helpful", "helpful"])]
    h = score_replies(helpful, tokenizer, PROMPTS, REPLIES_A, "sys")
    s = score_replies(safety, tokenizer, PROMPTS, REPLIES_A, "sys")
    for threshold in (0.0, 1.0, float(torch.sigmoid(s[1:]).mean())):
        models = RewardModels(helpful, tokenizer, safety, tokenizer, "sys", safety_threshold=threshold)
        rewards, _ = Reward(RewardSettings(reward_model_weight=2.0), models)(prompts, REPLIES_A, [True] * 3)
        use_safety = torch.tensor([True, *(torch.sigmoid(s[1:]) < threshold).tolist()])
        assert torch.allclose(rewards, 2.0 * torch.where(use_safety, s, h), atol=1e-5)


def test_a_conditional_reward_model_scores_each_kind_under_its_system_prompt(tiny_rm):
    from llm_lifecycle.workflows.rl.reward_model import score_replies
    from llm_lifecycle.workflows.rl.rewards import Reward, RewardModels, RewardSettings

    rm, tokenizer = tiny_rm
    user_only = [PROMPTS[0], PROMPTS[2], PROMPTS[0]]
    prompts = [{"messages": m, "answer": None, "kind": k} for m, k in zip(user_only, ["safety", "reasoning", None])]
    kind_prompts = {"safety": "Judge harmlessness.", "reasoning": "Judge the arithmetic."}
    cfg = RewardSettings(think_reward=0.5, kinds=["safety", "reasoning"], kind_prompts=kind_prompts)
    rewards, _ = Reward(cfg, RewardModels(rm, tokenizer, system_prompt="Default.", kind_prompts=kind_prompts))(
        prompts, ["<think>a</think>b", "x", "y"], [True, True, True])
    expected = torch.stack([score_replies(rm, tokenizer, [m], [r], s)[0] for m, r, s in zip(
        user_only, ["<think>a</think>b", "x", "y"], ["Judge harmlessness.", "Judge the arithmetic.", "Default."])])
    assert torch.allclose(rewards, expected + torch.tensor([0.5, 0.0, 0.0]), atol=1e-5)


# ---- the rl stage: a reward model trained on kinds, then PPO/GRPO scored by it ---------------------------


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    from llm_lifecycle.models.checkpoint import save_model_dir
    from llm_lifecycle.models.config import ModelConfig
    from llm_lifecycle.models.decoder import Decoder
    from llm_lifecycle.workflows.data.bpe import train_bpe

    tokenizer = train_bpe([arith.as_text(p) for p in arith.problems(300, seed=5)], vocab_size=300)
    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=tokenizer.get_vocab_size(), dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                ffn_dim=64, max_seq_len=256))
    return save_model_dir(tmp_path_factory.mktemp("sft") / "model", model, tokenizer)


TINY = ["rl.steps=2", "rl.batch_size=2", "rl.group_size=2", "rl.max_new_tokens=8", "rl.warmup_steps=1",
        "rl.max_pairs=6", "rl.heldout_pairs=4", "rl.seq_len=200", "rl.ppo_epochs=1"]
DATA = '[builtin:chat/en_hh_rlhf_harmless-base_test.jsonl.gz, builtin:arith/pairs.jsonl.gz]'


def _run(workspace, sft_dir, name, sets, inputs=None, stage="rl"):
    from llm_lifecycle.registry import tracking
    from llm_lifecycle.workflows.runner.recipe import load_recipe
    from llm_lifecycle.workflows.runner.stage import SilentProgress, StageContext, StageResult
    from llm_lifecycle.workflows.stages import rl

    recipe = load_recipe("arith-grpo", [*TINY, *sets])
    tracking.configure(workspace)
    with tracking.start_run(recipe.name, "rl", {"llm.stage": "rl"}) as tracker:
        inst = recipe.instances["rl"]
        ctx = StageContext(stage=stage, kind="rl", recipe=recipe, workspace=workspace, stage_dir=workspace / name,
                           inputs={"model": StageResult(outputs={"model": str(sft_dir)}), **(inputs or {})},
                           sources={"model": "sft", **{k: "rm" for k in inputs or {}}}, values=inst.upstream,
                           tracker=tracker, progress=SilentProgress(), seed=recipe.seed)
        return rl.run(ctx, inst.settings)


@pytest.fixture(scope="module")
def conditional_rm(tmp_path_factory, sft_dir):
    """A COOL-style reward model: two preference kinds, each under its own system prompt."""
    workspace = tmp_path_factory.mktemp("cool")
    return _run(workspace, sft_dir, "rm", ["rl.method=rm", f"rl.data={DATA}", "rl.kinds=[safety, reasoning]",
                                           "rl.kind_prompts={safety: Judge harmlessness., reasoning: Judge the sums.}"])


def test_a_reward_model_reports_heldout_accuracy_per_kind(conditional_rm):
    for kind in ("safety", "reasoning"):
        assert 0.0 <= conditional_rm.metrics[f"heldout_after.{kind}.rm_accuracy"] <= 1.0
    assert "heldout_after.rm_accuracy" in conditional_rm.metrics
    assert conditional_rm.model_alias == "rm"  # the stage named after its kind; a named instance keeps its name


def test_a_saved_reward_model_scores_chats_cut_where_its_training_cut_them(conditional_rm):
    from llm_lifecycle.workflows.rl.reward_model import load_reward_model

    model, _ = load_reward_model(conditional_rm.outputs["reward_model"])
    assert model.max_len == 200 and model.backbone.cfg.max_seq_len == 256  # rl.seq_len of TINY, not the model's


def test_reward_model_instances_start_from_their_own_head(tmp_path, sft_dir):
    """A judge must not start as the same function as the reward model it checks: the same
    settings and data under another instance name give another head; the same name, the same."""
    from safetensors.torch import load_file

    sets = ["rl.method=rm", "rl.data=[builtin:arith/pairs.jsonl.gz]", "rl.steps=1"]
    heads = {}
    for run, stage in (("a", "rm"), ("b", "rm"), ("c", "judge")):
        result = _run(tmp_path, sft_dir, run, sets, stage=stage)
        heads[run] = load_file(f"{result.outputs['reward_model']}/value_head.safetensors")["proj.weight"]
    assert torch.equal(heads["a"], heads["b"])
    assert not torch.allclose(heads["a"], heads["c"], atol=1e-2)


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_ppo_and_grpo_on_chat_prompts_take_their_reward_from_a_reward_model(workspace, sft_dir, conditional_rm, method):
    from llm_lifecycle.workflows.runner.stage import StageResult

    rm_dir = conditional_rm.outputs["reward_model"]
    judge = StageResult(outputs={"model": str(sft_dir), "reward_model": rm_dir})  # wired by `from: {judge: ...}`
    result = _run(workspace, sft_dir, method, [
        f"rl.method={method}", f"rl.reward_model={rm_dir}", "rl.heldout_prompts=3", "rl.kinds=[helpful]",
        "rl.problems=[builtin:chat/en_dolly_hhrlhf_train_small.jsonl]", "rl.language_reward=0.5", "rl.lr=1e-2",
    ], inputs={"judge": judge})
    m = result.metrics
    assert {"heldout_reward_before", "heldout_reward", "heldout_kl", "heldout_win_rate"} <= m.keys()
    assert m["heldout_prompts"] == 3 and 0.0 <= m["heldout_win_rate"] <= 1.0
    assert m["heldout_kl"] != 0.0  # the policy moved from the reference
    assert 1 <= m["heldout_reply_tokens"] <= 9  # max_new_tokens 8, plus the stop token
    for when in ("_before", ""):  # R1's language consistency of the held-out replies, per prompt kind
        assert 0.0 <= m[f"heldout_language_consistency{when}.helpful"] <= 1.0


def test_a_judge_wired_to_a_stage_that_made_no_reward_model_is_refused_with_the_graph():
    from llm_lifecycle.workflows.runner.recipe import load_recipe
    from llm_lifecycle.workflows.runner.settings import ConfigError

    with pytest.raises(ConfigError, match=r"stages.rl.from: judge <- sft, which makes no reward_model"):
        load_recipe("arith-grpo", ["rl.method=grpo", "rl.from={model: sft, judge: sft}"])




def test_every_method_holds_out_the_same_first_prompts_of_each_file(tmp_path, tiny_rm):
    """heldout_prompts means one thing for ppo, grpo, iterative-dpo and rs-sft: the first N
    prompts of each problems file, whatever seq_len and max_new_tokens are, never trained on."""
    import json

    from llm_lifecycle.workflows.rl.rewards import messages_of
    from llm_lifecycle.workflows.runner.recipe import load_recipe
    from llm_lifecycle.workflows.runner.stage import SilentProgress, StageContext
    from llm_lifecycle.workflows.stages import rl

    files = []
    for seed in (1, 2):
        path = tmp_path / f"problems-{seed}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in arith.problems(12, seed=seed)))
        files.append(path)
    first = [p["question"] for path in files for p in arith.problems(12, seed=int(path.stem[-1]))[:4]]
    _, tokenizer = tiny_rm
    seen = {}
    for method in ("ppo", "grpo", "iterative-dpo", "rs-sft"):
        for max_new_tokens in (8, 48):  # the longest of these prompts leaves room for 48 within seq_len
            recipe = load_recipe("arith-grpo", [f"rl.method={method}", "rl.heldout_prompts=4", "rl.seq_len=192",
                                                f"rl.max_new_tokens={max_new_tokens}",
                                                f"rl.problems=[{files[0]}, {files[1]}]"])
            ctx = StageContext(stage="rl", kind="rl", recipe=recipe, workspace=tmp_path, stage_dir=tmp_path, inputs={},
                               sources={}, values={}, tracker=None, progress=SilentProgress())
            cfg = recipe.settings("rl")
            if method == "rs-sft":  # it measures nothing on them, and never samples them
                trained = [p["question"] for p in rl._rs_problems(ctx, cfg)]
            else:
                heldout, train = rl._prompts(ctx, cfg, tokenizer)
                seen[method, max_new_tokens] = [messages_of(p)[-1]["content"] for p in heldout]
                trained = [messages_of(p)[-1]["content"] for p in train]
            assert trained and not set(trained) & set(first), (method, max_new_tokens)
    assert all(held == first for held in seen.values()), seen
def test_mismatched_pairs_reject_another_files_chosen_reply_from_the_same_training_half():
    """Each added pair keeps a training pair's prompt and chosen reply and rejects the chosen
    reply of a training pair of another file: never a held-out pair, never the other half's."""
    from llm_lifecycle.workflows.stages.rl import mismatched_pairs

    files = {0: [(f"en prompt {i}", f"en chosen {i}", f"en rejected {i}") for i in range(40)],
             1: [(f"zh prompt {i}", f"zh chosen {i}", f"zh rejected {i}") for i in range(10)],
             2: [(f"ar prompt {i}", f"ar chosen {i}", f"ar rejected {i}") for i in range(20)]}
    half_a = {i: pairs[0::2] for i, pairs in files.items()}  # what pair_half a trains on
    made = mismatched_pairs(list(half_a.values()), 0.5, seed=7)
    assert [i for i, _ in made].count(0) == 10 and [i for i, _ in made].count(1) == 2  # 0.5 x 20, 0.5 x 5
    for i, (prompt, chosen, rejected) in made:
        assert (prompt, chosen) in [(p, c) for p, c, _ in half_a[i]]
        source = [j for j, pairs in half_a.items() if rejected in [c for _, c, _ in pairs]]
        assert source and source[0] != i
    assert made == mismatched_pairs(list(half_a.values()), 0.5, seed=7)  # the seed alone decides
    assert made != mismatched_pairs(list(half_a.values()), 0.5, seed=8)
    assert mismatched_pairs([files[0]], 1.0, seed=7) == []  # one file: no other language to draw from


def test_a_reward_model_with_mismatched_pairs_measures_them_apart(tmp_path, sft_dir):
    result = _run(tmp_path, sft_dir, "mm", ["rl.method=rm", f"rl.data={DATA}", "rl.mismatched_pairs=1.0"])
    m = result.metrics
    assert 0.0 <= m["heldout_after.mismatched.rm_accuracy"] <= 1.0
    assert {"heldout_after.rm_accuracy", "heldout_before.mismatched.rm_accuracy"} <= m.keys()


def test_mismatched_pairs_need_an_rm_with_two_data_files():
    from llm_lifecycle.workflows.runner.recipe import load_recipe
    from llm_lifecycle.workflows.runner.settings import ConfigError

    with pytest.raises(ConfigError, match=r"stages.rl.mismatched_pairs: .*two or more data files"):
        load_recipe("arith-grpo", ["rl.method=rm", "rl.data=[builtin:arith/pairs.jsonl.gz]", "rl.mismatched_pairs=0.5"])
