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
trained tokenizer, with ids 0, 1, 2, and are added to a pretrained one that lacks them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from llm_lifecycle.models.checkpoint import SPECIAL_TOKENS
from llm_lifecycle.workflows.data import iter_groups, iter_texts
from llm_lifecycle.workflows.dedup import is_cjk
from llm_lifecycle.workflows.encode import encode_file
from llm_lifecycle.workflows.shards import is_complete, read_index, write_groups, write_parts
from llm_lifecycle.workflows.stage import StageContext, StageResult, UserError, atomic_path, reject_unknown_settings

EOT = SPECIAL_TOKENS[0]
SPACE = "\u0120"  # GPT-2's byte-level symbol for " "
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]  # byte fallback's tokens, as in LLaMA


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096  # the total, special and added tokens included
    min_frequency: int = 2
    split_digits: bool = True
    whitespace_runs: int = 0  # add tokens for runs of 2..N spaces; 0: none
    byte_fallback: bool = False  # False: GPT-2 byte-level BPE; True: character BPE + <0xXX> tokens
    special_tokens: list[str] = field(default_factory=list)  # after <|endoftext|>, <|im_start|>, <|im_end|>
    extend: str | None = None  # a tokenizer to extend with tokens learned on the Chinese text
    pretrained: str | None = None  # a tokenizer to use as it is

    @classmethod
    def from_cfg(cls, cfg: dict) -> "TokenizerConfig":
        reject_unknown_settings("stages.tokenizer-train", cfg, {f.name for f in fields(cls)})
        config = cls(**cfg)
        if config.extend and config.pretrained:
            raise UserError("stages.tokenizer-train: set either extend or pretrained, not both")
        if not 0 <= config.whitespace_runs <= 64 or config.whitespace_runs == 1:
            raise UserError(
                f"stages.tokenizer-train.whitespace_runs: expected 0 (none) or 2..64, got {config.whitespace_runs}"
            )
        if config.whitespace_runs and config.byte_fallback:
            raise UserError("stages.tokenizer-train.whitespace_runs: needs the byte-level model (byte_fallback: false)")
        if not all(isinstance(t, str) and t for t in config.special_tokens):
            raise UserError("stages.tokenizer-train.special_tokens: expected a list of non-empty strings")
        return config

    @property
    def specials(self) -> list[str]:
        return SPECIAL_TOKENS + [t for t in self.special_tokens if t not in SPECIAL_TOKENS]

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
    return tokenizer


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
        from llm_lifecycle.workflows.model_ref import resolve_model_dir

        path = resolve_model_dir(ref)
    elif not path.exists() and ref.count("/") == 1 and not ref.startswith(("/", ".", "~")):
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(ref, "tokenizer.json"))
        except Exception as err:  # offline without a cached copy, unknown repo, gated
            raise UserError(f"{key}: cannot get tokenizer.json of {ref} from the Hugging Face hub "
                            f"({type(err).__name__}); pass a local tokenizer.json or folder") from None
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
    return [t for t in cfg.specials if tokenizer.token_to_id(t) is None]


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float:
    """UTF-8 bytes per token over `texts`: higher means a tighter compression."""
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts))
    return sum(len(t.encode("utf-8")) for t in texts) / tokens if tokens else 0.0


def train_tokenizer(ctx: StageContext, cfg: dict) -> StageResult:
    """Stage tokenizer-train: `tokenizer.json` trained on data-clean's training text (or
    taken from a checkpoint), and its bytes per token on the held-out English and Chinese."""
    config = TokenizerConfig.from_cfg(cfg)
    clean_path = ctx.upstream_output("data-clean", "clean")
    heldout_path = ctx.upstream_output("data-clean", "heldout")
    ctx.tracker.log_input(clean_path, name="clean", context="tokenizer-train")
    with ctx.progress.task("loading tokenizer" if config.pretrained else "training BPE tokenizer"):
        tokenizer = build_tokenizer(config, iter_texts(clean_path))
    out = ctx.stage_dir / "tokenizer.json"
    with atomic_path(out) as tmp:
        tokenizer.save(str(tmp))
    ctx.tracker.log_artifact(out)

    metrics = {"vocab_size": float(tokenizer.get_vocab_size())}
    if tokenizer.get_vocab_size() < config.vocab_size:
        ctx.progress.log(f"  [yellow]the text supports only {tokenizer.get_vocab_size()} tokens; the rest stay unused[/yellow]")
    heldout = list(iter_texts(heldout_path))
    by_script = {"zh": [t for t in heldout if is_cjk(t)], "en": [t for t in heldout if not is_cjk(t)]}
    for script, texts in by_script.items():
        if texts:
            metrics[f"bytes_per_token.{script}"] = bytes_per_token(tokenizer, texts)
        else:
            ctx.progress.log(f"  no held-out {script} documents: bytes_per_token.{script} not measured")
    ctx.progress.log(
        f"  vocabulary {tokenizer.get_vocab_size()}; "
        + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.startswith("bytes_per_token"))
    )
    return StageResult(outputs={"tokenizer": str(out)}, metrics=metrics)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def tokenize(ctx: StageContext, cfg: dict) -> StageResult:
    """Stage tokenize: clean and held-out text as memory-mapped token shards."""
    tokenizer_path = ctx.upstream_output("tokenizer-train", "tokenizer")
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eot_id = tokenizer.token_to_id(EOT)
    if eot_id is None:
        raise UserError(f"the tokenizer has no {EOT} token; train it with tokenizer-train")
    shard_tokens = int(cfg.get("shard_tokens", 1 << 20))
    workers = int(cfg.get("workers", 0)) or os.cpu_count() or 1
    outputs: dict[str, str] = {}
    metrics: dict[str, float] = {}
    for split, text_name in (("train", "clean"), ("heldout", "heldout")):
        text_path = ctx.upstream_output("data-clean", text_name)
        out_dir = ctx.stage_dir / split
        if is_complete(out_dir):  # finished by an earlier, interrupted attempt of this stage
            index = read_index(out_dir)
            tokens, documents = index["tokens"], index["documents"]
            ctx.progress.log(f"  {split}: {tokens:,} tokens already written")
        else:
            ctx.tracker.log_input(text_path, name=text_name, context="tokenize")
            out_dir.mkdir(parents=True, exist_ok=True)
            write_groups(out_dir, list(iter_groups(text_path)))  # before the index marks the folder complete
            with ctx.progress.task(f"tokenize {split}", total=_count_lines(text_path)) as task:
                stats = write_parts(
                    out_dir,
                    encode_file(tokenizer_path, eot_id, text_path, workers),
                    vocab_size=tokenizer.get_vocab_size(),
                    shard_tokens=shard_tokens,
                    task=task,
                )
            tokens, documents = stats.tokens, stats.documents
            ctx.progress.log(f"  {split}: {tokens:,} tokens from {documents:,} documents in {stats.shards} shard(s)")
        outputs[split] = str(out_dir)
        metrics[f"tokens.{split}"] = float(tokens)
        metrics[f"documents.{split}"] = float(documents)
    if metrics["tokens.train"] == 0:
        raise UserError("tokenize produced no training tokens; check data-clean's output")
    return StageResult(outputs=outputs, metrics=metrics)
