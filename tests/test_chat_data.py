"""Chat data on the real SFT and preference files the package ships (workflows/data/builtin/chat):
loading, ChatML masks, batches, DPO loss."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from conftest import BUILTIN_EVAL, PACKAGE
from llm_lifecycle.workflows.data.chat_data import (
    IGNORE_INDEX,
    PreferenceBatches,
    SFTBatches,
    dpo_loss,
    encode_chat,
    encode_preference,
    encode_prompt,
    load_conversations,
    load_preference_pairs,
    sequence_logprobs,
    strip_alpaca_template,
)

CHAT = PACKAGE / "workflows" / "data" / "builtin" / "chat"
DOLLY = CHAT / "en_dolly_hhrlhf_train_small.jsonl"
OASST_SFT = CHAT / "zh_oasst1_sft_zh.json"
HH = CHAT / "en_hh_rlhf_harmless-base_test.jsonl.gz"
OASST_RM = CHAT / "zh_oasst1_rm_zh.json"


@pytest.fixture(scope="module")
def dolly():
    return load_conversations(DOLLY)


@pytest.fixture(scope="module")
def oasst():
    return load_conversations(OASST_SFT)


@pytest.fixture(scope="module")
def hh_pairs():
    return load_preference_pairs(HH)


@pytest.fixture(scope="module")
def tokenizer(dolly, oasst):
    """Byte-level BPE, vocab 1000, with <|endoftext|>, <|im_start|>, <|im_end|> as ids 0, 1, 2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((m["content"] for chat in dolly[:300] + oasst[:200] for m in chat), trainer)
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    return tok


def masked_spans(tokenizer, ids, mask) -> list[str]:
    """Decoded text of each run of consecutive masked tokens."""
    spans, run = [], []
    for token, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
    return spans


# ---- loading ----------------------------------------------------------------------------------


def test_dolly_prompts_lose_their_template(dolly):
    assert len(dolly) == 1000
    assert dolly[0] == [
        {"role": "user", "content": "what is kangen water?"},
        {"role": "assistant", "content": dolly[0][1]["content"]},
    ]
    for chat in dolly:
        assert [m["role"] for m in chat] == ["user", "assistant"]
        assert "### Instruction" not in chat[0]["content"] and "Below is an instruction" not in chat[0]["content"]
        assert chat[0]["content"] and chat[1]["content"]


def test_alpaca_template_with_input_keeps_the_input():
    prompt = ("Below is an instruction that describes a task, paired with an input.\n\n"
              "### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n")
    assert strip_alpaca_template(prompt) == "Translate.\n\nBonjour"
    assert strip_alpaca_template("  just a question\n") == "just a question"


def test_llamafactory_history_becomes_earlier_turns(oasst):
    assert len(oasst) == 689
    raw = json.loads(OASST_SFT.read_text(encoding="utf-8"))
    with_history = [i for i, r in enumerate(raw) if r["history"]]
    assert len(with_history) == 390
    i = with_history[0]
    (user0, assistant0), = raw[i]["history"][:1]
    assert oasst[i][:2] == [{"role": "user", "content": user0}, {"role": "assistant", "content": assistant0}]
    assert oasst[i][-2:] == [{"role": "user", "content": raw[i]["instruction"]},
                             {"role": "assistant", "content": raw[i]["output"]}]
    assert len(oasst[i]) == 2 * len(raw[i]["history"]) + 2


def test_chatml_jsonl_loads_and_bad_records_are_named(tmp_path, oasst):
    good = tmp_path / "chats.jsonl"
    good.write_text("\n".join(json.dumps({"messages": chat}, ensure_ascii=False) for chat in oasst[:20]) + "\n")
    assert load_conversations(good) == oasst[:20]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": oasst[0]}) + "\n"
                   + json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: record 1: .*robot"):
        load_conversations(bad)


def test_gsm8k_problems_are_conversations_with_the_worked_solution_as_reply():
    chats = load_conversations(BUILTIN_EVAL / "gsm8k" / "train.jsonl")
    assert len(chats) == 200
    assert [m["role"] for m in chats[0]] == ["user", "assistant"]
    assert chats[0][0]["content"].startswith("Natalia sold clips") and chats[0][1]["content"].endswith("#### 72")


def test_unknown_formats_name_the_file_and_the_accepted_formats():
    with pytest.raises(ValueError, match=r"test\.jsonl\.gz: unknown conversation format.*messages"):
        load_conversations(HH)
    with pytest.raises(ValueError, match=r"zh_oasst1_sft_zh\.json: unknown preference format.*hh-rlhf"):
        load_preference_pairs(OASST_SFT)


def test_hh_transcripts_split_into_prompt_and_differing_replies(hh_pairs):
    # 5 of the 2,312 transcripts diverge before their last reply (an answer with an inline
    # "Human:" splits differently): they are not two answers to one prompt, so they go.
    assert len(hh_pairs) == 2307
    for prompt, chosen, rejected in hh_pairs:
        assert chosen != rejected
        assert prompt and prompt[-1]["role"] == "user"
        assert prompt[0]["role"] == "user"  # (a few transcripts have two assistant turns in a row)
    # Prompt + chosen reply rebuild the chosen transcript (up to whitespace at turn edges).
    records = [json.loads(line) for line in gzip.open(HH, "rt", encoding="utf-8")]
    by_transcript = {" ".join(r["chosen"].split()): r for r in records}
    speaker = {"user": "Human", "assistant": "Assistant"}
    for prompt, chosen, rejected in hh_pairs:
        turns = prompt + [{"role": "assistant", "content": chosen}]
        rebuilt = "".join(f"\n\n{speaker[m['role']]}: {m['content']}" for m in turns)
        record = by_transcript[" ".join(rebuilt.split())]
        assert " ".join(record["rejected"].split()).endswith(" ".join(rejected.split()))
    prompt, chosen, _ = hh_pairs[0]
    assert prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert chosen.startswith("No, sorry!")


def test_llamafactory_rm_pairs_take_the_two_best_ranked():
    pairs = load_preference_pairs(OASST_RM)
    raw = json.loads(OASST_RM.read_text(encoding="utf-8"))
    assert len(pairs) == 772  # 775 less 3 whose two best answers are the same text
    assert all(chosen != rejected for _, chosen, rejected in pairs)
    assert pairs[0] == ([{"role": "user", "content": raw[0]["instruction"]}], raw[0]["output"][0], raw[0]["output"][1])
    assert sum(len(prompt) > 1 for prompt, _, _ in pairs) >= 390  # history turns kept


def test_prompt_chosen_rejected_jsonl(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    assert load_preference_pairs(path) == [([{"role": "user", "content": "2+2?"}], "4", "5")]


# ---- ChatML encoding --------------------------------------------------------------------------


def test_loss_mask_covers_exactly_the_assistant_replies(tokenizer, dolly, oasst):
    for chat in dolly[:50] + oasst[:150]:
        ids, mask = encode_chat(tokenizer, chat, max_len=100_000)
        replies = [m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant"]
        assert masked_spans(tokenizer, ids, mask) == replies
        rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat)
        assert ids == tokenizer.encode(rendered).ids  # piecewise encoding == encoding the whole text
        assert tokenizer.decode(ids, skip_special_tokens=False) == rendered


def test_default_system_prompt_and_truncation(tokenizer, dolly):
    chat = dolly[3]
    ids, mask = encode_chat(tokenizer, chat, max_len=100_000, default_system="You are a helpful assistant.")
    plain_ids, _ = encode_chat(tokenizer, chat, max_len=100_000)
    system = tokenizer.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n").ids
    assert ids == system + plain_ids and not any(mask[: len(system)])
    with_system = [{"role": "system", "content": "Be brief."}] + chat
    assert encode_chat(tokenizer, with_system, 100_000, default_system="ignored")[0][:6] == \
        tokenizer.encode("<|im_start|>system\nBe brief.<|im_end|>").ids[:6]
    short_ids, short_mask = encode_chat(tokenizer, chat, max_len=20)
    assert short_ids == plain_ids[:20] and len(short_mask) == 20


def test_encode_prompt_is_the_chat_up_to_the_reply(tokenizer, oasst):
    chat = oasst[1]
    ids, mask = encode_chat(tokenizer, chat, max_len=100_000)
    prompt = encode_prompt(tokenizer, chat[:-1])
    assert ids[: len(prompt)] == prompt
    assert mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1


def test_chat_encoding_needs_chatml_tokens(dolly):
    plain = Tokenizer(models.BPE())
    with pytest.raises(ValueError, match="<\\|im_start\\|>"):
        encode_chat(plain, dolly[0], max_len=64)


# ---- batches ---------------------------------------------------------------------------------


def test_sft_batches_are_a_function_of_seed_and_step(tokenizer, dolly):
    examples = [encode_chat(tokenizer, chat, max_len=96) for chat in dolly[:37]]
    a, b = SFTBatches(examples, batch_size=4, seed=7), SFTBatches(examples, batch_size=4, seed=7)
    late = [a.batch(s) for s in range(12)]
    for step in (11, 3, 0):  # any order, a fresh object: same batch (exact resume)
        assert all(torch.equal(x, y) for x, y in zip(b.batch(step), late[step]))
    resumed = b.batches(start_step=5)
    assert all(torch.equal(x, y) for x, y in zip(next(resumed), late[5]))
    other = SFTBatches(examples, batch_size=4, seed=8).batch(0)
    assert not torch.equal(other[0][:, :10], late[0][0][:, :10])

    # One epoch visits every kept example once (those whose reply max_len cut off entirely
    # are dropped), then the next epoch starts over in a new order.
    kept = {tuple(ids[:-1]) for ids, _ in a.examples}
    assert 0 < len(kept) < len(examples)
    rows = [tuple(r[r != 0].tolist()) for r in torch.cat([x for x, _ in late])]
    assert set(rows[: len(kept)]) == kept and len(set(rows[: len(kept)])) == len(kept)
    assert rows[len(kept): 2 * len(kept)] != rows[: len(kept)]


def test_sft_targets_are_shifted_ids_on_assistant_tokens_only(tokenizer, dolly):
    examples = [encode_chat(tokenizer, chat, max_len=80) for chat in dolly[:8]]
    inputs, targets = SFTBatches(examples, batch_size=8, seed=0).batch(0)
    assert inputs.shape == targets.shape and inputs.dtype == torch.long
    longest = max(len(ids) for ids, _ in examples)
    assert inputs.shape[1] == longest - 1
    for row_in, row_t in zip(inputs, targets):
        ids, mask = next(e for e in examples if e[0][: len(e[0]) - 1] == row_in[: len(e[0]) - 1].tolist())
        n = len(ids) - 1
        assert (row_in[n:] == 0).all()  # right-padded with <|endoftext|>
        expected = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])] + [IGNORE_INDEX] * (longest - 1 - n)
        assert row_t.tolist() == expected


def test_sft_batches_drop_examples_with_nothing_to_train(tokenizer, dolly):
    examples = [encode_chat(tokenizer, chat, max_len=5) for chat in dolly[:4]]  # reply cut off
    with pytest.raises(ValueError, match="no example has a trained token"):
        SFTBatches(examples, batch_size=2, seed=0)


def test_preference_batches_hold_chosen_and_rejected_replies(tokenizer, hh_pairs):
    encoded = [encode_preference(tokenizer, p, c, r, max_len=4096) for p, c, r in hh_pairs[:12]]
    batches = PreferenceBatches(encoded, batch_size=3, seed=1)
    chosen_ids, chosen_targets, rejected_ids, rejected_targets = batch = batches.batch(2)
    assert all(t.shape == chosen_ids.shape for t in batch)
    assert all(torch.equal(x, y) for x, y in zip(batch, PreferenceBatches(encoded, 3, seed=1).batch(2)))
    by_prompt_ids = {tuple(c[0][:20]): (p, cr, rr) for (p, cr, rr), (c, _) in zip(hh_pairs[:12], encoded)}
    for row in range(3):
        prompt, chosen, rejected = by_prompt_ids[tuple(chosen_ids[row, :20].tolist())]
        for targets, reply in ((chosen_targets[row], chosen), (rejected_targets[row], rejected)):
            trained = targets[targets != IGNORE_INDEX].tolist()
            # Only the final reply is trained, not the earlier assistant turns of the prompt.
            assert tokenizer.decode(trained, skip_special_tokens=False) == reply + "<|im_end|>"


# ---- losses ----------------------------------------------------------------------------------


def test_sequence_logprobs_sums_masked_token_logprobs():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.tensor([[1, 2, IGNORE_INDEX, 4, IGNORE_INDEX], [IGNORE_INDEX] * 4 + [7]])
    got = sequence_logprobs(logits, targets)
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([logp[0, 0, 1] + logp[0, 1, 2] + logp[0, 3, 4], logp[1, 4, 7]])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(sequence_logprobs(logits, targets, targets != IGNORE_INDEX), expected)
    nll = torch.nn.functional.cross_entropy(logits.view(-1, 11), targets.view(-1), reduction="sum")
    torch.testing.assert_close(-got.sum(), nll)


def test_dpo_loss_is_log2_at_the_reference_and_falls_as_chosen_rises():
    ref_c, ref_r = torch.tensor([-40.0, -12.0]), torch.tensor([-38.0, -15.0])
    loss, metrics = dpo_loss(ref_c.clone(), ref_r.clone(), ref_c, ref_r, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["reward_margin"].item() == 0 and metrics["reward_accuracy"].item() == 0

    policy_c = (ref_c + 0.0).requires_grad_()
    loss, _ = dpo_loss(policy_c, ref_r.clone(), ref_c, ref_r, beta=0.1)
    loss.backward()
    assert (policy_c.grad < 0).all()  # raising the chosen log-prob lowers the loss
    better, metrics = dpo_loss(ref_c + 5.0, ref_r.clone(), ref_c, ref_r, beta=0.1)
    assert better.item() == pytest.approx(-math.log(torch.sigmoid(torch.tensor(0.5)).item()))
    assert metrics["reward_chosen"].item() == pytest.approx(0.5)
    assert metrics["reward_rejected"].item() == 0
    assert metrics["reward_margin"].item() == pytest.approx(0.5)
    assert metrics["reward_accuracy"].item() == 1.0

    with_sft, metrics = dpo_loss(ref_c + 5.0, ref_r.clone(), ref_c, ref_r, beta=0.1,
                                 sft_nll=torch.tensor(2.0), sft_weight=0.5)
    assert with_sft.item() == pytest.approx(better.item() + 1.0)
    assert metrics["sft_nll"].item() == 2.0
