"""Arithmetic word problems with known answers, in GSM8K's format, for models small enough
to train in CPU minutes.

Each problem is {"question", "answer"} where the answer is a worked solution with the
calculator notes GSM8K uses (`<<12+7=19>>`) and a last line `#### 19`, so everything that
reads GSM8K (the verifiable rewards, SFT, lm-eval's gsm8k task) reads these too. Problems
take one or two steps of +, - or x on one-digit numbers (results up to 18),
so that a model of a few hundred thousand parameters can learn them in CPU minutes. Generation is a pure function of the
seed; `python -m llm_lifecycle.workflows.data.arith` rewrites the shipped files under
builtin/arith/ (a test checks they are what the generator makes).
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

from llm_lifecycle.models.chat_markup import EMPTY_THINK, THINK_END, THINK_START, THINKING_FLAGS

NAMES = ["Tom", "Ann", "Lily", "Sam", "Maya", "Ben", "Nora", "Leo", "Emma", "Jack", "Zoe", "Omar", "Ivy", "Max"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards", "coins", "eggs"]
PLACES = ["the market", "the shop", "school", "the fair", "the park"]


def _one_step(rng: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        c = a + b
        q = f"{name} has {a} {item}. {name} gets {b} more at {rng.choice(PLACES)}. How many {item} does {name} have now?"
        steps = [f"{name} has {a}+{b} = <<{a}+{b}={c}>>{c} {item} now."]
    elif kind == "sub":
        a = rng.randint(3, 18)
        b = rng.randint(1, min(9, a - 1))
        c = a - b
        q = f"{name} had {a} {item} and gave {b} of them away. How many {item} does {name} have left?"
        steps = [f"{name} has {a}-{b} = <<{a}-{b}={c}>>{c} {item} left."]
    else:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        c = a * b
        q = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?"
        steps = [f"{name} buys {a}*{b} = <<{a}*{b}={c}>>{c} {item}."]
    return q, steps, c


def _two_step(rng: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    c = rng.randint(1, min(9, a + b - 1))
    total = a + b
    q = (f"{name} has {a} {item} and finds {b} more. Then {name} gives {c} {item} to a friend. "
         f"How many {item} does {name} have at the end?")
    steps = [f"After finding more, {name} has {a}+{b} = <<{a}+{b}={total}>>{total} {item}.",
             f"After giving some away, {name} has {total}-{c} = <<{total}-{c}={total - c}>>{total - c} {item}."]
    return q, steps, total - c


def problem(rng: random.Random) -> dict[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    maker = _two_step if rng.random() < 0.3 else _one_step
    question, steps, answer = maker(rng, name, item)
    return {"question": question, "answer": "\n".join(steps) + f"\n#### {answer}"}


def problems(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict[str, str]]:
    """`n` distinct problems whose questions are not in `exclude` (held-out sets stay unseen)."""
    rng = random.Random(seed)
    seen = set(exclude)
    out = []
    while len(out) < n:
        p = problem(rng)
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


def as_text(p: dict[str, str]) -> str:
    """A problem as plain pretraining text (no chat template)."""
    return f"Question: {p['question']}\nAnswer: {p['answer']}"


def preference_pair(p: dict[str, str], rng: random.Random) -> dict[str, str]:
    """{prompt, chosen, rejected}: the worked solution, and the same solution whose last
    result (and final answer) is off by 1-5, so only the arithmetic tells them apart."""
    final = p["answer"].rsplit("#### ", 1)[1]
    right = int(final)
    wrong = right + rng.choice([d for d in range(-5, 6) if d and right + d >= 0])
    head, tail = p["answer"].rsplit(f"={right}>>{right}", 1)
    rejected = f"{head}={wrong}>>{wrong}{tail}".replace(f"#### {right}", f"#### {wrong}")
    return {"prompt": p["question"], "chosen": p["answer"], "rejected": rejected}


# The shipped split: test first, then train, the pretraining text and the preference pairs
# drawn so they never repeat a test question.
SPLITS = {"test": (200, 1), "train": (4000, 2), "corpus": (8000, 3), "pairs": (1200, 4), "direct": (1000, 5),
          "fusion": (2000, 6)}


def direct_answer(p: dict[str, str]) -> dict[str, str]:
    """The problem answered without the worked solution: the `#### N` line alone (a
    non-thinking reply, for fusing thinking and non-thinking modes as Qwen3's third stage)."""
    return {"question": p["question"], "answer": "#### " + p["answer"].rsplit("#### ", 1)[1]}


CALCULATOR_NOTE = re.compile(r"<<[^>]*>>")  # GSM8K's `<<12+7=19>>`, written before the result it computes


def thinking_chat(p: dict[str, str], thinking: bool) -> dict[str, list[dict[str, str]]]:
    """The problem as a chat in Qwen3's thinking template: asked with ` /think`, the worked
    steps inside <think> and the `#### N` line after it; asked with ` /no_think`, an empty think
    block and the `#### N` line alone (chat_data's module docstring has the template).
    The steps drop GSM8K's calculator notes: a small model that garbles one
    (`<<1+8=11>>111>>1`) was seen to end its turn inside the block, and plain words keep the
    block short and every number in it followed by text, never by the end of the reply."""
    steps, final = p["answer"].rsplit("\n", 1)
    reasoning = CALCULATOR_NOTE.sub("", steps)
    reply = f"{THINK_START}\n{reasoning}\n{THINK_END}\n\n{final}" if thinking else EMPTY_THINK + final
    flag = THINKING_FLAGS["think" if thinking else "no_think"]
    return {"messages": [{"role": "user", "content": p["question"] + flag}, {"role": "assistant", "content": reply}]}


def build_splits() -> dict[str, list[dict]]:
    test = problems(*SPLITS["test"])
    held = {p["question"] for p in test}
    return {
        "test": test,
        "train": problems(*SPLITS["train"], exclude=held),
        "corpus": [{"text": as_text(p)} for p in problems(*SPLITS["corpus"], exclude=held)],
        "pairs": [preference_pair(p, rng) for rng in [random.Random(SPLITS["pairs"][1])]
                  for p in problems(*SPLITS["pairs"], exclude=held)],
        "direct": [direct_answer(p) for p in problems(*SPLITS["direct"], exclude=held)],
        # Thinking and non-thinking chats alternate, so any first n of them are half of each.
        "fusion": [thinking_chat(p, thinking=i % 2 == 0) for i, p in enumerate(problems(*SPLITS["fusion"], exclude=held))],
    }


def write_builtin(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in build_splits().items():
        # mtime=0 keeps the gzip bytes a function of the content alone.
        with open(folder / f"{split}.jsonl.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows).encode())


if __name__ == "__main__":
    write_builtin(Path(__file__).parent / "builtin" / "arith")
