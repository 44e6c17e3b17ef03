"""Chat data on the real SFT and preference files the package ships (workflows/data/builtin/chat):
loading, ChatML masks, batches, DPO loss."""

from __future__ import annotations

import gzip
import json
import math
import re

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
    encode_reply,
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


def test_long_pairs_lose_the_prompts_oldest_tokens_not_the_reply(tokenizer, hh_pairs):
    """Keep-end truncation (TRL's): a multi-turn hh-rlhf pair too long for max_len keeps its
    final replies whole and the end of the prompt, so chosen and rejected still differ."""
    max_len = 96
    long = [(p, c, r) for p, c, r in hh_pairs
            if len(encode_reply(tokenizer, p, "", 100_000)[0]) > max_len and max(len(c), len(r)) < 60][:5]
    assert len(long) == 5
    for prompt, chosen, rejected in long:
        for (ids, mask), reply in zip(encode_preference(tokenizer, prompt, chosen, rejected, max_len), (chosen, rejected)):
            whole, whole_mask = encode_reply(tokenizer, prompt, reply, 100_000)
            assert len(ids) == max_len and ids == whole[-max_len:] and mask == whole_mask[-max_len:]
            trained = [t for t, m in zip(ids, mask) if m]
            assert tokenizer.decode(trained, skip_special_tokens=False) == reply + "<|im_end|>"
    # A reply longer than half of max_len keeps its start and at least half of max_len.
    prompt, chosen, _ = long[0]
    ids, mask = encode_reply(tokenizer, prompt, chosen + " more words" * 200, max_len)
    reply_alone, reply_mask = encode_reply(tokenizer, [], chosen + " more words" * 200, 100_000)
    assert len(ids) == max_len and ids[max_len // 2:] == reply_alone[: max_len // 2]
    assert mask == [0] * (max_len // 2) + reply_mask[: max_len // 2]
    # Short chats are not cut at all.
    short_prompt = [{"role": "user", "content": "Hi"}]
    assert encode_reply(tokenizer, short_prompt, "Hello!", max_len) == encode_reply(tokenizer, short_prompt, "Hello!", 100_000)


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


# ---- Qwen's extensions: tool turns (Qwen2.5) and thinking (Qwen3) ---------------------------------

# An OpenAI-style chat: two parallel calls (arguments as JSON text, content null), their results,
# then the answer.
TOOL_CHAT = [
    {"role": "system", "content": "You can call get_weather(city)."},
    {"role": "user", "content": "Weather in Oslo and Bergen?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Bergen"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'},
    {"role": "tool", "tool_call_id": "c2", "content": '{"temp": 5}'},
    {"role": "assistant", "content": "Oslo 3 C, Bergen 5 C."},
]
CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bergen"}}\n</tool_call>')
TOOL_CHAT_TEXT = (
    "<|im_start|>system\nYou can call get_weather(city).<|im_end|>\n"
    "<|im_start|>user\nWeather in Oslo and Bergen?<|im_end|>\n"
    f"<|im_start|>assistant\n{CALLS}<|im_end|>\n"
    '<|im_start|>user\n<tool_response>\n{"temp": 3}\n</tool_response>\n<tool_response>\n{"temp": 5}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\nOslo 3 C, Bergen 5 C.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def markup_tokenizer(dolly):
    """Our trained tokenizer (tokenizer-train's BPE): the chat markup as whole tokens 3..8."""
    from llm_lifecycle.workflows.data.bpe import train_bpe

    return train_bpe((m["content"] for chat in dolly[:300] for m in chat), vocab_size=1000)


def test_a_trained_tokenizer_keeps_the_chat_markup_whole_and_in_decoded_text(markup_tokenizer):
    markup = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
    assert [markup_tokenizer.token_to_id(t) for t in markup] == [3, 4, 5, 6, 7, 8]
    text = "<think>\nstep\n</think>\n\n<tool_call>\n{}\n</tool_call>"
    ids = markup_tokenizer.encode(text, add_special_tokens=False).ids
    assert ids[0] == 3 and 4 in ids and 5 in ids
    assert markup_tokenizer.decode(ids) == text  # not special: kept when special tokens are skipped


def test_openai_tool_chats_load_and_render_as_qwen25(tmp_path, markup_tokenizer):
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": TOOL_CHAT}) + "\n")
    chat = load_conversations(path)[0]
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert chat[2]["content"] == "" and chat[2]["tool_calls"][1] == {"name": "get_weather", "arguments": '{"city": "Bergen"}'}
    ids, _ = encode_chat(markup_tokenizer, chat, max_len=100_000)
    assert markup_tokenizer.decode(ids, skip_special_tokens=False) == TOOL_CHAT_TEXT
    assert ids == markup_tokenizer.encode(TOOL_CHAT_TEXT).ids  # piecewise == whole text
    # Arguments given as an object render the same JSON.
    as_object = [*chat[:2], {"role": "assistant", "content": "", "tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_weather", "arguments": {"city": "Bergen"}}]},
        *chat[3:]]
    assert encode_chat(markup_tokenizer, as_object, max_len=100_000)[0] == ids


def test_loss_mask_covers_exactly_the_assistants_tool_calls_token_by_token(markup_tokenizer):
    ids, mask = encode_chat(markup_tokenizer, TOOL_CHAT, max_len=100_000)
    # Expected, from the text alone: a token is trained iff its characters lie inside an
    # assistant turn's body or are that turn's <|im_end|>.
    trained_spans, start = [], 0
    for body in (CALLS, "Oslo 3 C, Bergen 5 C."):
        begin = TOOL_CHAT_TEXT.index("<|im_start|>assistant\n" + body, start) + len("<|im_start|>assistant\n")
        end = begin + len(body) + len("<|im_end|>")
        trained_spans.append((begin, end))
        start = end
    encoding = markup_tokenizer.encode(TOOL_CHAT_TEXT)
    assert encoding.ids == ids
    expected = [int(any(b <= lo and hi <= e for b, e in trained_spans)) for lo, hi in encoding.offsets]
    assert mask == expected
    assert masked_spans(markup_tokenizer, ids, mask) == [CALLS + "<|im_end|>", "Oslo 3 C, Bergen 5 C.<|im_end|>"]
    results = markup_tokenizer.encode("<tool_response>", add_special_tokens=False).ids
    assert all(m == 0 for token, m in zip(ids, mask) if token in results)


@pytest.mark.parametrize("bad, says", [
    ({"role": "user", "content": "x", "tool_calls": [{"name": "f", "arguments": {}}]}, "only assistant messages"),
    ({"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": "[1]"}]}, "object of arguments"),
    ({"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": "{oops"}]}, "JSONDecodeError"),
    ({"role": "tool", "content": None}, "content of a tool message is NoneType"),
])
def test_bad_tool_turns_are_named(tmp_path, bad, says):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, bad,
                                             {"role": "assistant", "content": "ok"}]}) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl: record 0: .*{says}"):
        load_conversations(path)


def test_thinking_flags_and_blocks():
    from llm_lifecycle.models.chat_markup import think_block, with_thinking_flag, without_thinking

    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]
    assert with_thinking_flag(chat, "") is chat
    assert [m["content"] for m in with_thinking_flag(chat, "no_think")] == ["2+2?", "4", "3+3? /no_think"]
    assert chat[2]["content"] == "3+3?"  # the caller's messages are left alone
    assert with_thinking_flag(chat, "think")[2]["content"] == "3+3? /think"
    assert think_block("<think>\n\n</think>\n\n#### 6") == ""
    assert think_block("<think>\n3+3=6\n</think>\n\n#### 6") == "3+3=6"
    assert think_block("#### 6") is None and think_block("<think>\nstill thinking") is None
    assert without_thinking("<think>\n3+3=6\n</think>\n\n#### 6") == "#### 6" and without_thinking("#### 6") == "#### 6"


def test_fusion_chats_put_worked_steps_in_think_and_direct_answers_after_an_empty_block(markup_tokenizer):
    from llm_lifecycle.models.chat_markup import think_block, without_thinking
    from llm_lifecycle.workflows.data import arith

    chats = load_conversations(PACKAGE / "workflows" / "data" / "builtin" / "arith" / "fusion.jsonl.gz")
    assert len(chats) == 2000
    think, no_think = chats[0], chats[1]
    assert think[0]["content"].endswith(" /think") and no_think[0]["content"].endswith(" /no_think")
    assert think[1]["content"].startswith("<think>\n") and no_think[1]["content"].startswith("<think>\n\n</think>\n\n#### ")
    # Every reply closes its block before the answer, and the answer is the `#### N` line alone.
    assert all(think_block(c[1]["content"]) is not None for c in chats)
    assert all(re.fullmatch(r"#### \d+", without_thinking(c[1]["content"])) for c in chats)
    # /think blocks hold the steps in plain words: no calculator note, no answer line, one or two lines.
    blocks = [think_block(c[1]["content"]) for c in chats if c[0]["content"].endswith(" /think")]
    assert all(b and "<<" not in b and "####" not in b and b.count("\n") <= 1 for b in blocks)
    assert sum(c[0]["content"].endswith(" /think") for c in chats[:100]) == 50  # any prefix is half of each
    held = {p["question"] for p in arith.problems(*arith.SPLITS["test"])}
    assert not held & {c[0]["content"].rsplit(" /", 1)[0] for c in chats}
    assert masked_spans(markup_tokenizer, *encode_chat(markup_tokenizer, no_think, 100_000)) == [no_think[1]["content"] + "<|im_end|>"]
