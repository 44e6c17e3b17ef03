"""Load any model directory we write: full-precision or quantized."""

from __future__ import annotations

import json
from pathlib import Path


def load_model(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) from one of our model directories (see docs/CONTRACTS.md)."""
    config = json.loads((Path(path) / "config.json").read_text())
    if "quantization" in config:
        from llm_lifecycle.models.quantize import load_quantized

        model, tokenizer = load_quantized(path)
        return model.to(device).eval(), tokenizer
    from llm_lifecycle.models.checkpoint import load_model_dir

    model, tokenizer = load_model_dir(path, device=device)
    return model.eval(), tokenizer
