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
    from llm_lifecycle.workflows.data.chat_data import encode_chat
    from llm_lifecycle.workflows.rl.reward_model import score_replies

    rm, tokenizer = tiny_rm
    batched = score_replies(rm, tokenizer, PROMPTS, REPLIES_A, "You are a helpful assistant.", batch_size=2)
    for prompt, reply, score in zip(PROMPTS, REPLIES_A, batched):
        ids, _ = encode_chat(tokenizer, [*prompt, {"role": "assistant", "content": reply}], 64,
                             default_system="You are a helpful assistant.")
        alone = rm(torch.tensor([ids]), torch.tensor([len(ids) - 1]))
        assert torch.allclose(alone, score, atol=1e-5)
    other_system = score_replies(rm, tokenizer, PROMPTS, REPLIES_A, "Judge safety.")
    assert other_system[0] != batched[0] and torch.allclose(other_system[1], batched[1], atol=1e-5)  # own system turn kept
    with pytest.raises(ValueError, match="3 prompts but 2 replies"):
        score_replies(rm, tokenizer, PROMPTS, REPLIES_A[:2], None)


def test_win_rate_counts_ties_half_and_is_symmetric(tiny_rm):
    from llm_lifecycle.workflows.rl.judge import win_rate

    rm, tokenizer = tiny_rm
    assert win_rate(rm, tokenizer, PROMPTS, REPLIES_A, REPLIES_A, None)["win_rate"] == 0.5
    ab = win_rate(rm, tokenizer, PROMPTS, REPLIES_A, REPLIES_B, None)
    ba = win_rate(rm, tokenizer, PROMPTS, REPLIES_B, REPLIES_A, None)
    assert ab["win_rate"] + ba["win_rate"] == pytest.approx(1.0) and ab["n"] == 3
    assert round(ab["win_rate"] * 3, 4) in (0, 1, 2, 3)  # whole prompts: no ties between different replies
