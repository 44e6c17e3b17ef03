"""Tokenizer stages: train (or take) a BPE tokenizer, then encode the text into shards.

The default follows GPT-2 / Qwen practice with Hugging Face `tokenizers`: NFC
normalisation, digits split one by one (as in LLaMA and Qwen, so numbers tokenize
uniformly), GPT-2's byte-level pre-tokenizer, and all 256 bytes in the initial alphabet,
so any text, Chinese included, encodes without unknown tokens. The options the reports use:

  split_digits     each digit its own token (LLaMA, Qwen, Baichuan)
  whitespace_runs  runs of 2..N spaces as single tokens, for code indentation (GPT-NeoX): merges
                   of the space byte with the highest priority, so a word keeps its own space
  byte_fallback    character-level BPE over a Metaspace pre-tokenizer whose unseen characters
                   fall back to <0xXX> byte tokens (LLaMA, Baichuan: SentencePiece-style)
  special_tokens   control tokens after the fixed ChatML ones
  extend           an existing tokenizer (file, folder, models:/ URI or hub id) whose vocabulary
                   is extended with tokens learned on the Chinese training text, appended
                   after its own ids with their merges (Chinese-LLaMA, Cui et al. 2023)
  pretrained       use an existing tokenizer as it is; train nothing

The fixed special tokens <|endoftext|>, <|im_start|>, <|im_end|> (ChatML) come first in a
trained tokenizer, with ids 0, 1, 2, and are added to a pretrained one that lacks them. The chat
markup of Qwen3's thinking mode and Qwen2.5's tool calls (<think>, </think>, <tool_call>, ...)
follows as ids 3..8: whole tokens that BPE never splits, but not special ones, so decoding keeps
them in the text (as in Qwen's tokenizers). A pretrained tokenizer keeps whatever markup it has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from llm_lifecycle.models.chat_markup import MARKUP_TOKENS
from llm_lifecycle.models.checkpoint import SPECIAL_TOKENS
from llm_lifecycle.workflows.data.dedup import is_cjk
from llm_lifecycle.workflows.runner.settings import AT_LEAST_1, ConfigError, Limit, Settings, setting
from llm_lifecycle.workflows.runner.stage import UserError

EOT = SPECIAL_TOKENS[0]
SPACE = "\u0120"  # GPT-2's byte-level symbol for " "
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]  # byte fallback's tokens, as in LLaMA


@dataclass
class TokenizerConfig(Settings):
    """tokenizer-train's settings (the stage kind owns them: workflows/stages/tokenizer_train.py)."""

    vocab_size: int = setting(4096, "the total, special and added tokens included (default: the model's)",
                              limit=Limit(lambda v: v >= 265,
                                          "an integer >= 265 (256 byte tokens plus the special and markup tokens)"))
    min_frequency: int = setting(2, "a merge must occur this often", limit=AT_LEAST_1)
    split_digits: bool = setting(True, "one token per digit (LLaMA, Qwen)")
    whitespace_runs: int = setting(0, "add tokens for runs of 2..N spaces (code); 0: none")
    byte_fallback: bool = setting(False, "False: GPT-2 byte-level BPE; True: character BPE + <0xXX> tokens")
    special_tokens: list[str] = setting([], "more special tokens after <|endoftext|>, <|im_start|>, <|im_end|> "
                                            "and the chat markup (<think>, <tool_call>, ...)")
    extend: str | None = setting(None, "a tokenizer to extend with tokens learned on the text (Chinese-LLaMA)")
    pretrained: str | None = setting(None, "a tokenizer to use as it is (default: the one of the model a recipe starts from)")

    def check(self, where: str, upstream: dict) -> None:
        if self.extend and self.pretrained:
            raise ConfigError(f"{where}: set either extend or pretrained, not both")
        if not 0 <= self.whitespace_runs <= 64 or self.whitespace_runs == 1:
            raise ConfigError(f"{where}.whitespace_runs: expected 0 (none) or 2..64, got {self.whitespace_runs}")
        if self.whitespace_runs and self.byte_fallback:
            raise ConfigError(f"{where}.whitespace_runs: needs the byte-level model (byte_fallback: false)")
        if not all(self.special_tokens):
            raise ConfigError(f"{where}.special_tokens: expected a list of non-empty strings")

    @property
    def specials(self) -> list[str]:
        """The tokens a trained tokenizer reserves first: ChatML's, the chat markup, the recipe's own."""
        fixed = SPECIAL_TOKENS + MARKUP_TOKENS
        return fixed + [t for t in self.special_tokens if t not in fixed]

    @property
    def reserved(self) -> int:
        """Tokens not learned by BPE: specials, <0xXX> bytes, whitespace runs."""
        return len(self.specials) + (len(BYTE_TOKENS) if self.byte_fallback else 0) + max(0, self.whitespace_runs - 1)


def new_tokenizer(split_digits: bool = True, byte_fallback: bool = False) -> Tokenizer:
    """An untrained BPE tokenizer: byte-level (GPT-2) or character-level with byte fallback
    over a Metaspace pre-tokenizer (SentencePiece / LLaMA)."""
    digits = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    if byte_fallback:
        tokenizer = Tokenizer(models.BPE(byte_fallback=True))
        # No SentencePiece dummy prefix ("▁" before the first word), like the byte-level model's
        # add_prefix_space=False: Metaspace adds it only when the text does not already start with
        # a space, so the decoder could not tell whether to strip it and " x" decoded as "x".
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(prepend_scheme="never"), *digits])
        tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tokenizer.decoder = decoders.ByteLevel()
    tokenizer.normalizer = normalizers.NFC()
    return tokenizer


def _check_room(vocab_size: int, needed: int, what: str) -> None:
    if vocab_size <= needed:
        raise UserError(f"stages.tokenizer-train.vocab_size: {vocab_size} is below {needed + 1} ({what})")


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2, **options) -> Tokenizer:
    """Train a BPE tokenizer on `texts` with the TokenizerConfig `options`; it has exactly
    `vocab_size` tokens when the text supports that many merges, and the special tokens
    first."""
    cfg = TokenizerConfig(vocab_size=vocab_size, min_frequency=min_frequency, **options)
    alphabet = [] if cfg.byte_fallback else pre_tokenizers.ByteLevel.alphabet()
    _check_room(vocab_size, cfg.reserved + len(alphabet) - 1, "the 256 bytes + special and whitespace tokens")
    tokenizer = new_tokenizer(cfg.split_digits, cfg.byte_fallback)
    model_size = vocab_size - (cfg.reserved - len(cfg.specials))  # the trainer counts the specials itself
    # Character BPE keeps the commonest characters (at most a quarter of the vocabulary);
    # rare ones are spelled in bytes, like SentencePiece's character_coverage.
    limit = {"limit_alphabet": (model_size - len(cfg.specials)) // 4} if cfg.byte_fallback else {}
    trainer = trainers.BpeTrainer(
        vocab_size=model_size,
        min_frequency=min_frequency,
        special_tokens=cfg.specials,
        initial_alphabet=alphabet,
        show_progress=False,
        **limit,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if cfg.byte_fallback:
        tokenizer = _with_tokens(tokenizer, BYTE_TOKENS)
    if cfg.whitespace_runs:
        # Every split of a run is a merge, so that any run up to N spaces ends as one token.
        runs = [(SPACE * a, SPACE * (n - a)) for n in range(2, cfg.whitespace_runs + 1) for a in range(1, n)]
        tokenizer = _with_tokens(tokenizer, [SPACE * n for n in range(2, cfg.whitespace_runs + 1)], first_merges=runs)
    return _not_special(tokenizer, MARKUP_TOKENS)


def _not_special(tokenizer: Tokenizer, tokens: list[str]) -> Tokenizer:
    """The tokenizer with `tokens` (reserved by the trainer as special tokens) made ordinary
    added tokens: still never split, but kept when decoding."""
    data = json.loads(tokenizer.to_str())
    for added in data["added_tokens"]:
        if added["content"] in tokens:
            added["special"] = False
    return Tokenizer.from_str(json.dumps(data))


def _model_json(tokenizer: Tokenizer) -> dict:
    data = json.loads(tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise UserError(f"the tokenizer is a {data['model']['type']} model; extending needs a BPE tokenizer")
    data["model"]["merges"] = [m.split(" ", 1) if isinstance(m, str) else m for m in data["model"]["merges"]]
    return data


def _with_tokens(tokenizer: Tokenizer, tokens: list[str], first_merges: list[tuple[str, str]] = ()) -> Tokenizer:
    """The tokenizer with `tokens` appended to its BPE vocabulary and `first_merges` put
    before all its merges (applied first)."""
    data = _model_json(tokenizer)
    vocab = data["model"]["vocab"]
    for token in tokens:
        vocab.setdefault(token, len(vocab) + len(data["added_tokens"]))
    first = [list(m) for m in first_merges]
    data["model"]["merges"] = first + [m for m in data["model"]["merges"] if m not in first]
    return Tokenizer.from_str(json.dumps(data))


def extend_vocabulary(base: Tokenizer, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """`base` with new tokens learned on the Chinese documents of `texts`, up to `vocab_size`
    in all: a BPE of the same pre-tokenization is trained on that text, and its merges whose
    result `base` lacks are appended, in the order learned (Chinese-LLaMA's vocabulary merge)."""
    data = _model_json(base)
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    wanted = vocab_size - base.get_vocab_size()
    _check_room(vocab_size, base.get_vocab_size(), f"the {base.get_vocab_size()} tokens of the tokenizer to extend")
    learner = Tokenizer.from_str(json.dumps({**data, "added_tokens": [], "model": {**data["model"], "vocab": {}, "merges": []}}))
    byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer"))
    trainer = trainers.BpeTrainer(
        vocab_size=256 + 4 * wanted, min_frequency=min_frequency, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
    )
    learner.train_from_iterator((t for t in texts if is_cjk(t)), trainer)
    next_id = max([*vocab.values(), *(t["id"] for t in data["added_tokens"])]) + 1
    added = 0
    for a, b in _model_json(learner)["model"]["merges"]:
        if added == wanted:
            break
        token = a + b
        if token in vocab or a not in vocab or b not in vocab:
            continue  # known already, or built from pieces this vocabulary never forms
        vocab[token] = next_id
        merges.append([a, b])
        next_id += 1
        added += 1
    return Tokenizer.from_str(json.dumps(data))


def load_tokenizer(ref: str, key: str) -> Tokenizer:
    """A tokenizer from a tokenizer.json, a folder holding one (a Hugging Face checkpoint or
    ours), a models:/ URI, or a hub repo id (from the local cache when offline)."""
    path = Path(ref).expanduser()
    if ref.startswith(("models:/", "runs:/")):
        from llm_lifecycle.workflows.refs import resolve_model_dir

        path = resolve_model_dir(ref)
    elif not path.exists() and ref.count("/") == 1 and not ref.startswith(("/", ".", "~")):
        from llm_lifecycle.workflows.refs import hub_snapshot

        path = hub_snapshot(ref, key, allow_patterns=["tokenizer.json"])
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{key}: no tokenizer at {ref}; give a tokenizer.json, a folder with one, "
                        "a models:/ URI or a Hugging Face repo id")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:
        raise UserError(f"{key}: {path} is not a Hugging Face tokenizer.json ({err})") from None


def build_tokenizer(cfg: TokenizerConfig, texts: Iterable[str]) -> Tokenizer:
    """The tokenizer the config describes, trained (or extended) on `texts`."""
    if cfg.pretrained:
        tokenizer = load_tokenizer(cfg.pretrained, "stages.tokenizer-train.pretrained")
    elif cfg.extend:
        base = load_tokenizer(cfg.extend, "stages.tokenizer-train.extend")
        tokenizer = extend_vocabulary(base, texts, cfg.vocab_size - len(_missing_specials(base, cfg)), cfg.min_frequency)
    else:
        return train_bpe(texts, **{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("extend", "pretrained")})
    tokenizer.add_special_tokens(_missing_specials(tokenizer, cfg))
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise UserError(
            f"stages.tokenizer-train.vocab_size: {cfg.vocab_size} is below the {tokenizer.get_vocab_size()} tokens "
            f"of {cfg.pretrained or cfg.extend}; set vocab_size to at least that (the model's embedding follows it)"
        )
    return tokenizer


def _missing_specials(tokenizer: Tokenizer, cfg: TokenizerConfig) -> list[str]:
    return [t for t in cfg.specials if t not in MARKUP_TOKENS and tokenizer.token_to_id(t) is None]


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float:
    """UTF-8 bytes per token over `texts`: higher means a tighter compression."""
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts))
    return sum(len(t.encode("utf-8")) for t in texts) / tokens if tokens else 0.0


