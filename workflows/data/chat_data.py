"""Chat data for SFT and DPO: read conversations and preference pairs from the common file
formats, render them as ChatML with a loss mask on the assistant's tokens, batch them in an
order fixed by (seed, step), and score them (sequence log-probs, the DPO loss).

Formats read (detected from the first record):
  conversations     dolly/Alpaca-prompt jsonl {"prompt", "response"} (mosaicml llm-foundry);
                    LLaMA-Factory alpaca JSON {instruction, input, output, history[, system]};
                    ChatML / OpenAI jsonl {"messages": [{"role", "content"}, ...]}, tool turns
                    included (role "tool", an assistant's "tool_calls");
                    GSM8K jsonl {"question", "answer"} (the worked solution is the reply)
  preference pairs  Anthropic hh-rlhf jsonl(.gz) {"chosen", "rejected"} whole transcripts;
                    LLaMA-Factory rm JSON {instruction, input, output: [better, worse], history};
                    TRL-style {"prompt", "chosen", "rejected"} (prompt a string or messages)

The template is ChatML, `<|im_start|>{role}\n{content}<|im_end|>\n` per turn, with Qwen's
two extensions:
  thinking (Qwen3)  an assistant reply may open with `<think>\n...\n</think>\n\n`, the
                    reasoning; a non-thinking reply has the empty block `<think>\n\n</think>\n\n`.
                    A user turn ending in ` /think` or ` /no_think` asks for either (the soft
                    switch). Both are plain text in the messages: chats without them render
                    exactly as before.
  tool calls        (Qwen2.5) an assistant's calls follow its content, each
                    `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` on lines of
                    their own; the tools' results go back as one user turn of
                    `<tool_response>\n{result}\n</tool_response>` blocks (consecutive results
                    share the turn). Tool schemas are not rendered: put them in the system turn.
                    The loss covers the assistant's turns, calls included, never the results.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llm_lifecycle.models.chat_markup import TOOL_CALL_END, TOOL_CALL_START, TOOL_RESPONSE_END, TOOL_RESPONSE_START
from llm_lifecycle.models.decoder import IGNORE_INDEX  # the target the model's loss skips

log = logging.getLogger(__name__)

Message = dict[str, Any]  # {"role": one of ROLES, "content": str[, "tool_calls": [{"name", "arguments"}]]}
Conversation = list[Message]
PreferencePair = tuple[Conversation, str, str]  # (prompt messages, chosen reply, rejected reply)
Encoded = tuple[list[int], list[int]]  # (token ids, loss mask: 1 where the model is trained)

ROLES = ("system", "user", "assistant", "tool")
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

CONVERSATION_FORMATS = (
    'dolly/Alpaca-prompt jsonl {"prompt", "response"}; LLaMA-Factory alpaca JSON '
    '{"instruction", "input", "output", "history"}; ChatML jsonl {"messages": [{"role", "content"}]}; '
    'GSM8K jsonl {"question", "answer"}'
)
PREFERENCE_FORMATS = (
    'hh-rlhf jsonl(.gz) {"chosen", "rejected"} transcripts; LLaMA-Factory rm JSON '
    '{"instruction", "input", "output": [better, worse], "history"}; {"prompt", "chosen", "rejected"}'
)


# ---- reading records --------------------------------------------------------------------------


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON array file or a JSON-lines file, either optionally gzipped.
    The content decides which (a leading '[' is an array), not the suffix: LLaMA-Factory
    names both kinds .json."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    else:
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from None
    if not records:
        raise ValueError(f"{path}: no records")
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: every record must be a JSON object")
    return records


def _convert_all(path: Path, records: list[dict], convert: Callable[[dict], Any]) -> list[Any]:
    """convert(record) for each record; a malformed one raises ValueError naming file and index."""
    out = []
    for i, record in enumerate(records):
        try:
            out.append(convert(record))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise ValueError(f"{path}: record {i}: {type(err).__name__}: {err}") from None
    return out


def _tool_call(call: dict) -> dict[str, Any]:
    """{"name", "arguments"} of an OpenAI call {"type": "function", "function": {...}} or a bare
    {"name", "arguments"}; arguments an object or the JSON text of one (OpenAI's), kept as given."""
    function = call.get("function", call)
    name, arguments = function["name"], function.get("arguments", {})
    parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    if not isinstance(name, str) or not isinstance(parsed, dict):
        raise TypeError("a tool call needs a string name and an object of arguments")
    return {"name": name, "arguments": arguments}


def _check_message(m: dict) -> Message:
    role, calls = m["role"], m.get("tool_calls") or []
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if calls and role != "assistant":
        raise ValueError(f"a {role} message has tool_calls; only assistant messages make calls")
    content = "" if m.get("content") is None and calls else m["content"]  # OpenAI: null beside calls
    if not isinstance(content, str):
        raise TypeError(f"content of a {role} message is {type(content).__name__}, not a string")
    return {"role": role, "content": content, **({"tool_calls": [_tool_call(c) for c in calls]} if calls else {})}


def _check_conversation(messages: Conversation) -> Conversation:
    return [_check_message(m) for m in messages]


# ---- conversations (SFT) ----------------------------------------------------------------------

# The Alpaca prompt template (with or without an "### Input:" section) as mosaicml's
# dolly_hhrlhf prompts carry it: an optional preamble, the instruction, the response header.
_ALPACA_TEMPLATE = re.compile(
    r"\A(?:.*?\n\n)?### Instruction:\n(?P<instruction>.*?)\n\n"
    r"(?:### Input:\n(?P<input>.*?)\n\n)?### Response:\s*\Z",
    re.S,
)


def strip_alpaca_template(prompt: str) -> str:
    """The plain instruction inside an Alpaca-style prompt (its input appended after a blank
    line); a prompt without the template is returned stripped of outer whitespace."""
    match = _ALPACA_TEMPLATE.match(prompt)
    if match is None:
        return prompt.strip()
    instruction = match["instruction"].strip()
    return f"{instruction}\n\n{match['input'].strip()}" if match["input"] else instruction


def _prompt_response_conversation(record: dict) -> Conversation:
    return [
        {"role": "user", "content": strip_alpaca_template(record["prompt"])},
        {"role": "assistant", "content": record["response"]},
    ]


def _alpaca_turns(record: dict) -> Conversation:
    """System, history and the current user turn of a LLaMA-Factory alpaca record (no reply)."""
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for user, assistant in record.get("history") or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    # LLaMA-Factory joins instruction and input with a newline.
    query = "\n".join(part for part in (record["instruction"], record.get("input") or "") if part)
    return messages + [{"role": "user", "content": query}]


def _alpaca_conversation(record: dict) -> Conversation:
    return _alpaca_turns(record) + [{"role": "assistant", "content": record["output"]}]


def _chatml_conversation(record: dict) -> Conversation:
    return record["messages"]


def _question_answer_conversation(record: dict) -> Conversation:
    return [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["answer"]}]


def _checked_training_conversation(messages: Conversation) -> Conversation:
    messages = _check_conversation(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message, so nothing to train on")
    return messages


def load_conversations(path: str | Path) -> list[Conversation]:
    """Conversations (lists of {"role", "content"}) from any format in CONVERSATION_FORMATS."""
    path = Path(path)
    records = read_records(path)
    first = records[0]
    if "messages" in first:
        convert = _chatml_conversation
    elif {"prompt", "response"} <= first.keys():
        convert = _prompt_response_conversation
    elif {"instruction", "output"} <= first.keys() and isinstance(first["output"], str):
        convert = _alpaca_conversation
    elif {"question", "answer"} <= first.keys():
        convert = _question_answer_conversation
    else:
        raise ValueError(
            f"{path}: unknown conversation format (first record has keys {sorted(first)}); "
            f"accepted: {CONVERSATION_FORMATS}"
        )
    return _convert_all(path, records, lambda r: _checked_training_conversation(convert(r)))


# ---- preference pairs (DPO) ---------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def split_hh_transcript(transcript: str) -> Conversation:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages. Only markers after a blank line
    start a turn; 'Human:' inside a reply stays part of it."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise ValueError(f"text before the first turn marker: {parts[0][:60]!r}")
    return [{"role": _HH_ROLES[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _hh_pair(record: dict) -> PreferencePair | None:
    """Prompt = the turns both transcripts share; None when they differ before the last
    assistant turn (then they answer different conversations, not one prompt)."""
    chosen, rejected = split_hh_transcript(record["chosen"]), split_hh_transcript(record["rejected"])
    if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
        return None
    if chosen[:-1] != rejected[:-1]:
        return None
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _rm_pair(record: dict) -> PreferencePair:
    better, worse = record["output"][0], record["output"][1]  # ranked best first; the first two
    return _alpaca_turns(record), better, worse


def _prompt_chosen_rejected_pair(record: dict) -> PreferencePair:
    prompt = record["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return messages, record["chosen"], record["rejected"]


def _checked_pair(pair: PreferencePair | None) -> PreferencePair | None:
    if pair is None:
        return None
    prompt, chosen, rejected = pair
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise TypeError("chosen and rejected replies must be strings")
    return _check_conversation(prompt), chosen, rejected


def load_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """(prompt messages, chosen reply, rejected reply) from any format in PREFERENCE_FORMATS.
    Pairs whose replies are identical, or whose conversations diverge before the final reply,
    teach nothing about one prompt and are dropped with a warning."""
    path = Path(path)
    records = read_records(path)
    first = records[0]
    if {"prompt", "chosen", "rejected"} <= first.keys():
        convert = _prompt_chosen_rejected_pair
    elif {"chosen", "rejected"} <= first.keys() and isinstance(first["chosen"], str):
        convert = _hh_pair
    elif {"instruction", "output"} <= first.keys() and isinstance(first["output"], list):
        convert = _rm_pair
    else:
        raise ValueError(
            f"{path}: unknown preference format (first record has keys {sorted(first)}); "
            f"accepted: {PREFERENCE_FORMATS}"
        )
    converted = _convert_all(path, records, lambda r: _checked_pair(convert(r)))
    pairs = [p for p in converted if p is not None and p[1] != p[2]]
    if len(pairs) < len(records):
        log.warning("%s: dropped %d of %d pairs (identical replies or diverging conversations)",
                    path, len(records) - len(pairs), len(records))
    return pairs


# ---- ChatML encoding ----------------------------------------------------------------------------


def special_token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {token} token; chat data needs the ChatML tokens {IM_START} and {IM_END}")
    return token_id


def _tool_call_text(call: dict[str, Any]) -> str:
    """Qwen2.5's line for one call (what transformers renders from the exported template)."""
    arguments = call["arguments"]
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    name = json.dumps(call["name"], ensure_ascii=False)
    return f'{TOOL_CALL_START}\n{{"name": {name}, "arguments": {arguments}}}\n{TOOL_CALL_END}'


def _turns(messages: Conversation) -> list[tuple[str, str]]:
    """(role, text) of each ChatML turn: an assistant's tool calls follow its content, and a
    run of tool results becomes one user turn of <tool_response> blocks (Qwen2.5)."""
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            block = f"{TOOL_RESPONSE_START}\n{m['content']}\n{TOOL_RESPONSE_END}"
            if i and messages[i - 1]["role"] == "tool":
                turns[-1] = ("user", f"{turns[-1][1]}\n{block}")
            else:
                turns.append(("user", block))
        else:
            calls = [_tool_call_text(_tool_call(c)) for c in m.get("tool_calls", ())]
            turns.append((m["role"], "\n".join(([m["content"]] if m["content"] else []) + calls)))
    return turns


def _render(tokenizer, messages: Conversation, default_system: str | None) -> Encoded:
    """`<|im_start|>{role}\\n{text}<|im_end|>\\n` per turn (see _turns). Each piece is encoded on
    its own so the mask boundaries are exact; the special tokens split the text at the same
    places anyway, so the ids match encoding the rendered string for byte-level BPE. The mask
    is 1 on the assistant's text and its <|im_end|>: never on a tool's result."""
    im_start, im_end = special_token_id(tokenizer, IM_START), special_token_id(tokenizer, IM_END)
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": default_system}, *messages]
    turns = _turns(messages)
    pieces = ["\n"] + [text for role, body in turns for text in (role + "\n", body)]
    encoded = [e.ids for e in tokenizer.encode_batch(pieces, add_special_tokens=False)]
    newline, headers, bodies = encoded[0], encoded[1::2], encoded[2::2]
    ids: list[int] = []
    mask: list[int] = []
    for (role, _), header, body in zip(turns, headers, bodies):
        trained = int(role == "assistant")
        ids += [im_start, *header, *body, im_end, *newline]
        mask += [0] * (1 + len(header)) + [trained] * (len(body) + 1) + [0] * len(newline)
    return ids, mask


def encode_chat(tokenizer, messages: Conversation, max_len: int, default_system: str | None = None) -> Encoded:
    """ChatML token ids and a loss mask that is 1 on assistant content and its <|im_end|>
    only; both cut to `max_len`. `default_system` is prepended when the chat has no system turn."""
    ids, mask = _render(tokenizer, messages, default_system)
    return ids[:max_len], mask[:max_len]


def encode_prompt(tokenizer, messages: Conversation, default_system: str | None = None) -> list[int]:
    """Ids of `messages` followed by the header of the assistant turn to generate."""
    ids, _ = _render(tokenizer, messages, default_system)
    header = tokenizer.encode("assistant\n", add_special_tokens=False).ids
    return ids + [special_token_id(tokenizer, IM_START), *header]


def encode_reply(
    tokenizer, prompt_messages: Conversation, reply: str, max_len: int, default_system: str | None = None,
) -> Encoded:
    """The chat `prompt_messages` + one assistant `reply`, masked on the reply only, cut to
    `max_len` the way TRL's keep-end truncation cuts: the prompt loses its oldest tokens
    first, so the reply — the only part preference pairs differ in, and what a reward model
    reads at its last token — stays whole when it fits in half of `max_len`, or keeps its
    start when longer. Reward-model training (encode_preference) and scoring (score_replies)
    both cut this way, so they read the same tokens."""
    prompt_ids, _ = _render(tokenizer, prompt_messages, default_system)
    reply_ids, reply_mask = _render(tokenizer, [{"role": "assistant", "content": reply}], None)
    prompt_room = min(len(prompt_ids), max(max_len // 2, max_len - len(reply_ids)))
    prompt_ids = prompt_ids[len(prompt_ids) - prompt_room:]
    reply_room = max_len - prompt_room
    return prompt_ids + reply_ids[:reply_room], [0] * prompt_room + reply_mask[:reply_room]


def encode_preference(
    tokenizer, prompt_messages: Conversation, chosen: str, rejected: str, max_len: int,
    default_system: str | None = None,
) -> tuple[Encoded, Encoded]:
    """(encoded chosen chat, encoded rejected chat), each cut to `max_len` by encode_reply
    (the prompt's oldest tokens go first). Only the final reply is masked in: earlier
    assistant turns belong to the prompt, which both sides share, so they would cancel in
    the DPO margin and only add noise to an SFT term."""
    return (encode_reply(tokenizer, prompt_messages, chosen, max_len, default_system),
            encode_reply(tokenizer, prompt_messages, rejected, max_len, default_system))


# ---- deterministic batches ----------------------------------------------------------------------


def _trainable(example: Encoded) -> bool:
    """At least one target is trained once inputs and targets are shifted by one."""
    return any(example[1][1:])


class _EpochOrder:
    """Example index for every global position: epoch e visits all examples in a
    permutation drawn from a generator seeded by (seed, e), so position -> example depends
    only on the seed, never on what ran before (a resumed run sees the same data)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache = {epoch: np.random.default_rng([self.seed % (1 << 64), epoch]).permutation(self.n)}
        return self._cache[epoch]

    def indices(self, step: int, batch_size: int) -> list[int]:
        positions = range(step * batch_size, (step + 1) * batch_size)
        return [int(self._permutation(p // self.n)[p % self.n]) for p in positions]


def _pad_rows(rows: Sequence[Encoded], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [R, length], targets [R, length]): inputs are ids[:-1] right-padded with
    `pad_id`; targets are ids[1:] where the mask trains them, IGNORE_INDEX elsewhere."""
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        inputs[r, :n] = torch.tensor(ids[:-1])
        trained = torch.tensor(mask[1:], dtype=torch.bool)
        targets[r, :n] = torch.where(trained, torch.tensor(ids[1:]), IGNORE_INDEX)
    return inputs, targets


class SFTBatches:
    """(input_ids [B, T], targets [B, T]) batches of encoded chats; T is the longest row of
    the batch minus one. Examples with nothing to train on are dropped up front."""

    def __init__(self, examples: Sequence[Encoded], batch_size: int, seed: int, pad_id: int = 0):
        self.examples = [e for e in examples if _trainable(e)]
        if not self.examples:
            raise ValueError("no example has a trained token (are the assistant replies cut off by max_len?)")
        self.batch_size, self.pad_id = batch_size, pad_id
        self._order = _EpochOrder(len(self.examples), seed)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.examples[i] for i in self._order.indices(step, self.batch_size)]
        return _pad_rows(rows, max(len(ids) for ids, _ in rows) - 1, self.pad_id)

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches from `start_step` on."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


@torch.no_grad()
def assistant_loss(model, examples: Sequence[Encoded], batch_size: int, pad_id: int) -> float:
    """Mean next-token cross-entropy over the trained (assistant) tokens of `examples`: SFT's
    held-out metric, weighted by token as training is."""
    examples = [e for e in examples if _trainable(e)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        rows = examples[start : start + batch_size]
        inputs, targets = _pad_rows(rows, max(len(ids) for ids, _ in rows) - 1, pad_id)
        n = int((targets != IGNORE_INDEX).sum())
        total += float(model(inputs.to(device), targets=targets.to(device)).loss) * n
        count += n
    model.train(was_training)
    return total / count


def pack(examples: Sequence[Encoded], seq_len: int) -> list[list[int]]:
    """Example indices per row of at most `seq_len + 1` tokens, first fit in the given order
    (an example longer than that is cut to fit a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, (ids, _) in enumerate(examples):
        n = min(len(ids), seq_len + 1)
        row = next((r for r, free in enumerate(room) if free >= n), None)
        if row is None:
            rows.append([])
            room.append(seq_len + 1)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= n
    return rows


class PackedSFTBatches:
    """SFT batches with several examples per row and no attention between them:
    (inputs [B, T], targets [B, T], position_ids [B, T], attn_mask Bool[B, T, T]), T = seq_len.
    Each example keeps its own positions (from 0) and a causal mask inside its block, so a
    packed row computes exactly what the examples would compute one by one, with far less
    padding. Rows are packed once, in an order fixed by the seed."""

    def __init__(self, examples: Sequence[Encoded], batch_size: int, seq_len: int, seed: int, pad_id: int = 0):
        examples = [e for e in examples if _trainable(e)]
        if not examples:
            raise ValueError("no example has a trained token (are the assistant replies cut off by max_len?)")
        order = np.random.default_rng([seed % (1 << 64), 1 << 20]).permutation(len(examples))
        shuffled = [examples[i] for i in order]
        self.rows = [[shuffled[i] for i in row] for row in pack(shuffled, seq_len)]
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self._order = _EpochOrder(len(self.rows), seed)

    def _row(self, parts: list[Encoded]) -> tuple[torch.Tensor, ...]:
        length = self.seq_len
        inputs = torch.full((length,), self.pad_id, dtype=torch.long)
        targets = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros(length, dtype=torch.long)
        doc = torch.full((length,), -1, dtype=torch.long)  # padding: a document of its own
        start = 0
        for d, (ids, mask) in enumerate(parts):
            ids, mask = ids[: length + 1], mask[: length + 1]
            x, y = _pad_rows([(ids, mask)], len(ids) - 1, self.pad_id)
            n = min(len(ids) - 1, length - start)
            inputs[start : start + n], targets[start : start + n] = x[0, :n], y[0, :n]
            positions[start : start + n] = torch.arange(n)
            doc[start : start + n] = d
            start += n
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        same_doc = doc[:, None] == doc[None, :]
        return inputs, targets, positions, causal & (same_doc | torch.eye(length, dtype=torch.bool))

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        rows = [self._row(self.rows[i]) for i in self._order.indices(step, self.batch_size)]
        return tuple(torch.stack(parts) for parts in zip(*rows))

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Endless batches from `start_step` on."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


class PreferenceBatches:
    """(chosen_ids, chosen_targets, rejected_ids, rejected_targets), each [B, T] with one T
    for all four so the loss can run chosen and rejected through the model as one batch of
    2B. Targets are IGNORE_INDEX except on the reply tokens. Pairs where either reply is cut
    off entirely are dropped up front."""

    def __init__(self, pairs: Sequence[tuple[Encoded, Encoded]], batch_size: int, seed: int, pad_id: int = 0):
        self.pairs = [p for p in pairs if _trainable(p[0]) and _trainable(p[1])]
        if not self.pairs:
            raise ValueError("no pair has trained tokens in both replies (are they cut off by max_len?)")
        self.batch_size, self.pad_id = batch_size, pad_id
        self._order = _EpochOrder(len(self.pairs), seed)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen, rejected = zip(*(self.pairs[i] for i in self._order.indices(step, self.batch_size)))
        length = max(len(ids) for ids, _ in chosen + rejected) - 1
        return (*_pad_rows(chosen, length, self.pad_id), *_pad_rows(rejected, length, self.pad_id))

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Endless batches from `start_step` on."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


# ---- losses -------------------------------------------------------------------------------------


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the masked positions of log p(target | prefix): [B]. logits [B, T, V] predict
    targets [B, T]; mask [B, T] defaults to targets != IGNORE_INDEX."""
    if mask is None:
        mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask.bool(), 0)  # any valid index; masked out below
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    sft_nll: torch.Tensor | None = None,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO (Rafailov et al. 2023): -log σ(β[(π_c - ref_c) - (π_r - ref_r)]), averaged
    over the batch, plus `sft_weight * sft_nll` when given (Qwen2 adds the chosen replies'
    NLL so the policy does not drift off its good answers). Metrics are detached scalars:
    the implicit rewards β(π - ref) of each side, their margin and how often chosen wins."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    preference_loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    loss = preference_loss
    metrics = {
        "dpo_loss": preference_loss.detach(),
        "reward_chosen": chosen_rewards.detach().mean(),
        "reward_rejected": rejected_rewards.detach().mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).detach().mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().detach(),
    }
    if sft_nll is not None and sft_weight:
        loss = loss + sft_weight * sft_nll
        metrics["sft_nll"] = sft_nll.detach()
    return loss, metrics


def pair_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen log-probs [B], rejected log-probs [B], chosen targets) of a PreferenceBatches
    batch, chosen and rejected run through the model as one batch of 2B."""
    chosen_ids, chosen_tgt, rejected_ids, rejected_tgt = batch
    width = max(chosen_ids.size(1), rejected_ids.size(1))
    pad = lambda t, v: F.pad(t, (0, width - t.size(1)), value=v)  # noqa: E731
    ids = torch.cat([pad(chosen_ids, 0), pad(rejected_ids, 0)])
    tgt = torch.cat([pad(chosen_tgt, IGNORE_INDEX), pad(rejected_tgt, IGNORE_INDEX)])
    logps = sequence_logprobs(model(ids).logits.float(), tgt)
    n = chosen_ids.size(0)
    return logps[:n], logps[n:], tgt[:n]


def dpo_train_loss(reference, beta: float, sft_weight: float):
    """The trainer's loss_fn(model, batch) for DPO against the frozen `reference`, with the
    chosen replies' per-token NLL weighted by `sft_weight` when it is not 0."""

    def loss_fn(model, batch):
        pc, pr, chosen_tgt = pair_logps(model, batch)
        with torch.no_grad():
            rc, rr, _ = pair_logps(reference.to(pc.device), batch)
        sft_nll = -(pc / (chosen_tgt != IGNORE_INDEX).sum(-1).clamp(min=1)).mean() if sft_weight else None
        loss, m = dpo_loss(pc, pr, rc, rr, beta, sft_nll=sft_nll, sft_weight=sft_weight)
        return loss, {k: float(v) for k, v in m.items()}

    return loss_fn
