"""Reading a YAML file the way a recipe needs: UTF-8 text, and every key of a mapping once.

PyYAML keeps the last of two equal keys without a word, so a recipe that sets `model:`
twice would run with half of what its author wrote; here the second one is an error with
both line numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ~10x faster


class _UniqueKeyLoader(_SAFE_LOADER):  # type: ignore[misc, valid-type]
    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: the base constructor says so
                break
            if seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first_line[key]}); give each key once",
                    key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def utf8_text(path: Path) -> str:
    """The file's text; ValueError naming the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                         "save the file as UTF-8") from None


def load(text: str) -> Any:
    """yaml.safe_load, refusing a mapping that repeats a key (a yaml.YAMLError with its line)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)
