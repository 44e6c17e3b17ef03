"""Tokenizer stages: train a byte-level BPE tokenizer, then encode the text into shards.

The tokenizer follows GPT-2 / Qwen practice with Hugging Face `tokenizers`: NFC
normalisation, digits split one by one (as in LLaMA and Qwen, so numbers tokenize
uniformly), GPT-2's byte-level pre-tokenizer, and all 256 bytes in the initial alphabet,
so any text, Chinese included, encodes without unknown tokens. The special tokens come
first, with ids 0, 1, 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from llm_lifecycle.models.checkpoint import SPECIAL_TOKENS
from llm_lifecycle.workflows.data import iter_texts
from llm_lifecycle.workflows.dedup import is_cjk
from llm_lifecycle.workflows.encode import encode_file
from llm_lifecycle.workflows.shards import is_complete, read_index, write_parts
from llm_lifecycle.workflows.stage import StageContext, StageResult, UserError, atomic_path

EOT = SPECIAL_TOKENS[0]


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with our normaliser and pre-tokenizers."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`; SPECIAL_TOKENS get ids 0, 1, 2."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(SPECIAL_TOKENS) + len(alphabet)
    if vocab_size < smallest:
        raise UserError(
            f"stages.tokenizer-train.vocab_size: {vocab_size} is below {smallest} (256 bytes + special tokens)"
        )
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float:
    """UTF-8 bytes per token over `texts`: higher means a tighter compression."""
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts))
    return sum(len(t.encode("utf-8")) for t in texts) / tokens if tokens else 0.0


def train_tokenizer(ctx: StageContext, cfg: dict) -> StageResult:
    """Stage tokenizer-train: `tokenizer.json` trained on data-clean's training text."""
    clean_path = ctx.upstream_output("data-clean", "clean")
    heldout_path = ctx.upstream_output("data-clean", "heldout")
    ctx.tracker.log_input(clean_path, name="clean", context="tokenizer-train")
    with ctx.progress.task("training BPE tokenizer"):
        tokenizer = train_bpe(iter_texts(clean_path), cfg.get("vocab_size", 4096), cfg.get("min_frequency", 2))
    out = ctx.stage_dir / "tokenizer.json"
    with atomic_path(out) as tmp:
        tokenizer.save(str(tmp))
    ctx.tracker.log_artifact(out)

    metrics = {"vocab_size": float(tokenizer.get_vocab_size())}
    if tokenizer.get_vocab_size() < cfg.get("vocab_size", 4096):
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
    tokenizer = Tokenizer.from_file(str(ctx.upstream_output("tokenizer-train", "tokenizer")))
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
            with ctx.progress.task(f"tokenize {split}", total=_count_lines(text_path)) as task:
                stats = write_parts(
                    out_dir,
                    encode_file(tokenizer.to_str(), eot_id, text_path, workers),
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
