"""Named model configurations: models/presets/<name>.yaml, each a mapping of ModelConfig fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PRESETS_DIR = Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The preset's fields as a dict (pass to ModelConfig.from_dict, after any overrides)."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown model preset '{name}'; known presets: {', '.join(list_presets())}")
    fields = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: expected a mapping of model settings")
    return fields
