"""Our model directory: config.json + model.safetensors + tokenizer.json (docs/CONTRACTS.md).

Writes are atomic: everything goes into a temporary directory beside the target, which is
then renamed into place, so a crash leaves either the old directory or the new one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from llm_lifecycle.models.atomic import atomic_dir
from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder

FORMAT = "llm-lifecycle"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 in trained tokenizers
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"


def save_model_dir(path: str | Path, model: Decoder, tokenizer, extra: dict[str, Any] | None = None) -> Path:
    """Write `model` (and its `tokenizers.Tokenizer`) to `path`, replacing what was there."""
    reserved = {"format", "model"} & set(extra or {})
    if reserved:
        raise ValueError(f"extra may not set {', '.join(sorted(reserved))}: they describe the model itself")
    with atomic_dir(path) as tmp:
        config = {"format": FORMAT, "model": model.cfg.to_dict(), **(extra or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        # save_model stores tied tensors once and checks nothing shares memory unexpectedly.
        save_model(model, str(tmp / WEIGHTS_FILE))
        if tokenizer is not None:
            tokenizer.save(str(tmp / TOKENIZER_FILE))
    return Path(path)


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a model directory, checked to be ours."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no {CONFIG_FILE})")
    config = json.loads(file.read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise ValueError(f"{file}: format is {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load_model_dir(path: str | Path, device: str = "cpu"):
    """(Decoder in eval mode on `device`, tokenizers.Tokenizer or None when the directory has none)."""
    from tokenizers import Tokenizer

    path = Path(path)
    cfg = ModelConfig.from_dict(read_config(path)["model"])
    model = Decoder(cfg)
    load_model(model, str(path / WEIGHTS_FILE), strict=True, device=str(device))
    model.to(device)
    tokenizer_file = path / TOKENIZER_FILE
    tokenizer = Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file.is_file() else None
    return model.eval(), tokenizer


def grow_vocab(cfg: ModelConfig, state: dict[str, torch.Tensor], vocab_size: int):
    """(config, state dict) with the embedding (and head) grown to `vocab_size` rows, each
    new row the mean of the existing ones: new tokens start as an average token."""
    extra = vocab_size - cfg.vocab_size
    for name in ("tok_embeddings.weight", "lm_head.weight"):
        rows = state[name]
        state[name] = torch.cat([rows, rows.mean(dim=0, keepdim=True).expand(extra, -1)])
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_embeddings.weight"]
    if cfg.head_bias:
        bias = state["lm_head.bias"]
        state["lm_head.bias"] = torch.cat([bias, bias.mean().expand(extra)])
    return dataclasses.replace(cfg, vocab_size=vocab_size), state
