"""Stage tokenize: clean and held-out text as memory-mapped token shards."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from llm_lifecycle.workflows.data.clean import iter_groups
from llm_lifecycle.workflows.data.encode import encode_file
from llm_lifecycle.workflows.data.shards import is_complete, read_index, write_groups, write_parts
from llm_lifecycle.workflows.data.bpe import EOT
from llm_lifecycle.workflows.runner.settings import AT_LEAST_1, NON_NEGATIVE, Settings, setting
from llm_lifecycle.workflows.runner.stage import Port, StageContext, StageKind, StageResult, UserError


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


@dataclass
class TokenizeSettings(Settings):
    shard_tokens: int = setting(1 << 20, "tokens per memory-mapped shard file", limit=AT_LEAST_1)
    workers: int = setting(0, "encoding processes; 0: one per CPU core", limit=NON_NEGATIVE)


def run(ctx: StageContext, cfg: TokenizeSettings) -> StageResult:
    """Stage tokenize: clean and held-out text as memory-mapped token shards."""
    tokenizer_path = ctx.input_path("tokenizer", "tokenizer")
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eot_id = tokenizer.token_to_id(EOT)
    if eot_id is None:
        raise UserError(f"the tokenizer has no {EOT} token; train it with tokenizer-train")
    shard_tokens = cfg.shard_tokens
    workers = cfg.workers or os.cpu_count() or 1
    outputs: dict[str, str] = {}
    metrics: dict[str, float] = {}
    for split, text_name in (("train", "clean"), ("heldout", "heldout")):
        text_path = ctx.input_path("text", text_name)
        out_dir = ctx.stage_dir / split
        if is_complete(out_dir):  # finished by an earlier, interrupted attempt of this stage
            index = read_index(out_dir)
            tokens, documents = index["tokens"], index["documents"]
            ctx.progress.log(f"  {split}: {tokens:,} tokens already written")
        else:
            ctx.tracker.log_input(text_path, name=text_name, context=ctx.stage)
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


KIND = StageKind("tokenize", TokenizeSettings, run, inputs=(Port("text", "text"), Port("tokenizer", "tokenizer")),
                 output="shards")
