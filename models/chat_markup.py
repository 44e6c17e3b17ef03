"""The markup of Qwen's chat extensions to ChatML, shared by training (workflows/data/chat_data.py),
generation and the exported template (models/hf.py chatml_template).

- Thinking (Qwen3): a reply opens with `<think>\\n...\\n</think>\\n\\n`, its reasoning; a
  non-thinking reply with the empty block. A user turn ending in ` /think` or ` /no_think`
  asks for either (the soft switch).
- Tool calls (Qwen2.5): `<tool_call>` JSON in the assistant's turn, results in `<tool_response>`.

All six are whole tokens in a tokenizer we train (ids 3..8), but not special ones, so decoding
keeps them in the text, as Qwen's tokenizers do.
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
MARKUP_TOKENS = [THINK_START, THINK_END, TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END]
EMPTY_THINK = f"{THINK_START}\n\n{THINK_END}\n\n"  # a non-thinking reply's empty block
THINKING_FLAGS = {"think": " /think", "no_think": " /no_think"}  # the soft switch, ending a user turn
THINKING_MODES = ("", *THINKING_FLAGS)  # "": prompts as they are

Conversation = list[dict]  # [{"role", "content", ...}]


def with_thinking_flag(messages: Conversation, thinking: str) -> Conversation:
    """`messages` with Qwen3's soft switch, ` /think` or ` /no_think` (thinking "think" or
    "no_think"), ending the last user turn; thinking "" leaves them as they are."""
    if not thinking:
        return messages
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        raise ValueError("a thinking flag needs a user turn to end")
    flagged = {**messages[last], "content": messages[last]["content"] + THINKING_FLAGS[thinking]}
    return [*messages[:last], flagged, *messages[last + 1 :]]


def think_block(reply: str) -> str | None:
    """The text inside a reply's leading <think> block, stripped ("" for Qwen3's empty block);
    None when the reply does not open with a complete one."""
    head, sep, _ = reply.lstrip().partition(THINK_END)
    if not sep or not head.startswith(THINK_START):
        return None
    return head[len(THINK_START) :].strip()


def without_thinking(reply: str) -> str:
    """The reply with its leading think block removed: what a multi-turn chat keeps of earlier
    replies (Qwen3 drops past reasoning from the context)."""
    return reply.lstrip().partition(THINK_END)[2].lstrip() if think_block(reply) is not None else reply
