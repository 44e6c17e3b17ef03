"""Stage tokenizer-train: a byte-level BPE tokenizer trained on the clean text, extended, or taken as is."""

from __future__ import annotations

from llm_lifecycle.workflows.data.bpe import TokenizerConfig, build_tokenizer, bytes_per_token
from llm_lifecycle.workflows.data.clean import iter_texts
from llm_lifecycle.workflows.data.dedup import is_cjk
from llm_lifecycle.workflows.runner.stage import Port, StageContext, StageKind, StageResult, atomic_path


def run(ctx: StageContext, config: TokenizerConfig) -> StageResult:
    """`tokenizer.json` trained on the clean training text (or taken from a checkpoint), and
    its bytes per token on the held-out English and Chinese."""
    clean_path = ctx.input_path("text", "clean")
    heldout_path = ctx.input_path("text", "heldout")
    ctx.tracker.log_input(clean_path, name="clean", context=ctx.stage)
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




KIND = StageKind("tokenizer-train", TokenizerConfig, run, inputs=(Port("text", "text"),), output="tokenizer")
