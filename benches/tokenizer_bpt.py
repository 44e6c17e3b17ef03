"""Bytes per token on held-out English and Chinese: our tokenizer options against a GPT-2
style byte-level BPE trained on the same text without them.

Training text (from DATA/corpus; --data DATA, ../shared/data by default): Wikipedia (first
25 articles), C4 (first 250 documents), Shakespeare (first 85 %), WikiText-2 valid, and about 3 MB of the Chinese
classics. Held out, never trained on: the last 5 Wikipedia articles, the last 50 C4
documents, the last 15 % of Shakespeare, WikiText-2 test, and the last 1 MB of the Chinese
classics. Higher bytes per token = the same text in fewer tokens.

Rows:
  gpt2-style     ByteLevel pre-tokenizer + BPE, <|endoftext|> only: GPT-2's recipe
  ours           NFC, digits split, whitespace runs up to 16, ChatML control tokens
  ours-fallback  character BPE over Metaspace with <0xXX> byte fallback (LLaMA style)
  en-only        gpt2-style trained on the English text alone, half the vocabulary
  en-only+zh     en-only extended to the full vocabulary with tokens learned on the Chinese
                 text (Chinese-LLaMA)

    python benches/tokenizer_bpt.py [--vocab 8192]
"""

from __future__ import annotations

import argparse
import json
import re
import time
import unicodedata
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llm_lifecycle.workflows.data.bpe import SPECIAL_TOKENS, bytes_per_token, extend_vocabulary, train_bpe

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # the default --data: beside the clone


def split_corpus(corpus: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    """(English train, Chinese train, English held-out, Chinese held-out) documents."""
    _read = lambda name: (corpus / name).read_text(encoding="utf-8")  # noqa: E731
    wiki = [line for line in _read("en_wiki_demo.txt").splitlines() if line.strip()]
    c4 = [json.loads(line)["text"] for line in _read("en_c4_demo.jsonl").splitlines()]
    shakespeare = [p for p in re.split(r"\n\s*\n", _read("en_tinyshakespeare.txt")) if p.strip()]
    cut = int(len(shakespeare) * 0.85)
    wikitext_valid = [p for p in re.split(r"\n \n", _read("en_wikitext2_valid_tokenized.txt")) if p.strip()]
    wikitext_test = [p for p in re.split(r"\n \n", _read("en_wikitext2_test_tokenized.txt")) if p.strip()]
    poetry = [p for p in re.split(r"\n\s*\n", _read("zh_chinese_poetry_classics.txt")) if p.strip()]
    zh_train, zh_heldout = _take(poetry, 3e6), _take(poetry[::-1], 1e6)
    en_train = wiki[:25] + c4[:250] + shakespeare[:cut] + wikitext_valid
    en_heldout = wiki[25:] + c4[250:] + shakespeare[cut:] + wikitext_test
    return en_train, zh_train, en_heldout, zh_heldout


def _take(docs: list[str], size: float) -> list[str]:
    out, total = [], 0
    for doc in docs:
        if total >= size:
            break
        out.append(doc)
        total += len(doc.encode("utf-8"))
    return out


def gpt2_style(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL_TOKENS[0]], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--data", type=Path, default=SHARED_DATA,
                        help="the benchmark data folder (its corpus/ holds the source texts; not in the repository)")
    args = parser.parse_args()
    en_train, zh_train, en_heldout, zh_heldout = split_corpus(args.data / "corpus")
    mb = lambda docs: sum(len(d.encode("utf-8")) for d in docs) / 1e6  # noqa: E731
    print(f"train: English {mb(en_train):.1f} MB, Chinese {mb(zh_train):.1f} MB; "
          f"held out: English {mb(en_heldout):.1f} MB, Chinese {mb(zh_heldout):.1f} MB", flush=True)
    train = en_train + zh_train
    english_only = gpt2_style(en_train, args.vocab // 2)
    builders = {
        "gpt2-style": lambda: gpt2_style(train, args.vocab),
        "ours": lambda: train_bpe(train, args.vocab, whitespace_runs=16),
        "ours-fallback": lambda: train_bpe(train, args.vocab, byte_fallback=True),
        "en-only": lambda: english_only,
        "en-only+zh": lambda: extend_vocabulary(english_only, zh_train, args.vocab),
    }
    print("\n| tokenizer | vocabulary | English bytes/token | Chinese bytes/token | train s |")
    print("|---|---|---|---|---|")
    for name, build in builders.items():
        t0 = time.perf_counter()
        tokenizer = build()
        seconds = time.perf_counter() - t0
        en, zh = bytes_per_token(tokenizer, en_heldout), bytes_per_token(tokenizer, zh_heldout)
        for text in en_heldout[:50] + zh_heldout[:50]:  # every tokenizer gives the text back
            assert tokenizer.decode(tokenizer.encode(text).ids) in (text, unicodedata.normalize("NFC", text)), (name, text[:80])
        print(f"| {name} | {tokenizer.get_vocab_size()} | {en:.3f} | {zh:.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
