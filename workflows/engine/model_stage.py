"""What the model-making stages share: loading the upstream model, saving ours, perplexity."""

from __future__ import annotations

from pathlib import Path

import torch

from llm_lifecycle.workflows.runner.stage import StageContext, UserError


def load_input_model(ctx: StageContext, port: str = "model"):
    """(model, tokenizer, model directory) of the model on the stage's input `port`."""
    from llm_lifecycle.models.checkpoint import load_model_dir

    model_dir = ctx.input_path(port, "model")
    model, tokenizer = load_model_dir(model_dir)
    return model, tokenizer, model_dir


def load_init_model(ref: str, where: str):
    """(model, tokenizer) a stage starts from instead of an input's: `stages.X.init`."""
    from llm_lifecycle.models.checkpoint import load_model_dir
    from llm_lifecycle.workflows.refs import resolve_model_dir

    model, tokenizer = load_model_dir(resolve_model_dir(ref))
    if tokenizer is None:
        raise UserError(f"{where}: {ref} has no tokenizer.json; give a model that ships its tokenizer")
    return model, tokenizer


def check_thinking_budget(model_dir: str | Path, budget: int, where: str) -> None:
    """A thinking budget (Qwen3) closes the think block with </think>: refuse one for a model
    whose tokenizer has no <think> tokens before anything runs (a model without a tokenizer
    is refused where it is loaded)."""
    from tokenizers import Tokenizer

    from llm_lifecycle.models.checkpoint import TOKENIZER_FILE
    from llm_lifecycle.models.generate import thinking_budget

    path = Path(model_dir) / TOKENIZER_FILE
    if not budget or not path.is_file():
        return
    try:
        thinking_budget(Tokenizer.from_file(str(path)), budget)
    except ValueError as err:
        raise UserError(f"{where}: {model_dir}: {err}; use a model whose tokenizer has them (ours from "
                        "tokenizer-train, Qwen3's) or no budget (0)") from None


def save_stage_model(ctx: StageContext, model, tokenizer, extra: dict | None = None) -> Path:
    from llm_lifecycle.models.checkpoint import save_model_dir

    from llm_lifecycle.workflows.engine.ranks import is_main_process

    out = ctx.stage_dir / "model"
    if not is_main_process():  # under torchrun every rank holds the same weights; rank 0 writes them
        return out
    save_model_dir(out, model.cpu(), tokenizer, extra={**model_provenance(ctx), **(extra or {})})
    return out


def model_provenance(ctx: StageContext) -> dict:
    """What a saved model's config.json records of the stage that made it: the stage, the recipe,
    and the system prompt it was fine-tuned with (from sft on), which `llm chat` then uses when
    given none, since a model trained with a system turn answers differently without one."""
    system_prompt = ctx.values.get("system_prompt")
    return {"stage": ctx.stage, "recipe": ctx.recipe.name, **({"system_prompt": system_prompt} if system_prompt else {})}


def heldout_perplexity(ctx: StageContext, model, seq_len: int, max_windows: int) -> float:
    """Perplexity on the held-out token shards at `seq_len` (non-overlapping windows)."""
    from llm_lifecycle.evals.perplexity import perplexity
    from llm_lifecycle.workflows.data.shards import TokenShards

    shards = TokenShards(ctx.input_path("shards", "heldout"))
    tokens = torch.as_tensor(shards.tokens[: seq_len * max_windows].astype("int64"))
    if tokens.numel() < seq_len + 1:
        raise UserError(
            f"held-out text has {tokens.numel()} tokens, fewer than one window of {seq_len}; "
            "raise the data-clean stage's holdout_fraction or add data"
        )
    device = next(model.parameters()).device
    return perplexity(model.to(device), tokens, seq_len, max_windows=max_windows)
