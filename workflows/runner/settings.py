"""Typed stage settings: each stage kind owns one dataclass of them.

A field is declared with `setting(default, help, ...)`: its type (the annotation), its
default, the values it may take (`choices`) or the limit it must keep (`limit`), and one
line of help. Recipe validation, `llm recipes show`, the CLI's help and docs/CONTRACTS.md
are all made from these declarations; nothing else repeats them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from llm_lifecycle.workflows.refs import data_path
from llm_lifecycle.workflows.runner.stage import UserError


class ConfigError(UserError):
    """A mistake in a recipe or a --set: one line naming the file and the setting."""


@dataclass(frozen=True)
class Limit:
    test: Callable[[Any], bool]
    says: str  # what a value must be, for the error line: "an integer >= 1"
    says_for_int: str = ""  # the same for an int field, where "finite number" would mislead

    def words(self, tp: Any) -> str:
        ints = tp is int or set(typing.get_args(tp)) == {int, type(None)}  # int or int | None
        return self.says_for_int if ints and self.says_for_int else self.says


AT_LEAST_1 = Limit(lambda v: v >= 1, "an integer >= 1")
POSITIVE = Limit(lambda v: math.isfinite(v) and v > 0, "a finite number > 0", "an integer >= 1")
NON_NEGATIVE = Limit(lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0", "an integer >= 0")
FRACTION = Limit(lambda v: 0 <= v <= 1, "a number from 0 to 1")
BELOW_1 = Limit(lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1")
NON_EMPTY_STRINGS = Limit(lambda v: bool(v) and all(isinstance(x, str) and x for x in v), "a non-empty list of strings")


def setting(default: Any, help: str, *, choices: tuple = (), limit: Limit | None = None, files: bool = False) -> Any:
    """A settings field: `default` (copied per instance when mutable), one line of `help`,
    the allowed `choices` or a `limit`. `files`: the value names data files (builtin:NAME or
    local paths; "" for none), which must exist when the recipe is read, not when the stage
    that reads them is already running."""
    meta = {"help": help, "choices": tuple(choices), "limit": limit, "files": files}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def with_defaults(base: type, **defaults: Any) -> type:
    """`base` with other defaults for some of its fields (SFT trains 60 steps, pretrain 200):
    same fields, same help and limits."""
    hints = typing.get_type_hints(base)
    fields_ = []
    for f in dataclasses.fields(base):
        if f.name in defaults:
            new = setting(defaults[f.name], f.metadata["help"], choices=f.metadata["choices"], limit=f.metadata["limit"])
            fields_.append((f.name, hints[f.name], new))
    return dataclasses.make_dataclass(base.__name__, fields_, bases=(base,))


class Settings:
    """Base of every kind's settings class: checks that span several fields go in `check`."""

    def check(self, where: str, upstream: dict[str, Any]) -> None:
        """Raise ConfigError for a combination of values that cannot work; `upstream` holds
        what the stage's inputs pass on (workflows/runner/graph.py `Instance.values`)."""

    def passes_on(self, upstream: dict[str, Any]) -> dict[str, Any]:
        """What this stage passes to the stages that take its outputs (seq_len, system prompt,
        model config, ...), given what its own inputs passed to it."""
        return {}

    def makes(self) -> set[str]:
        """Outputs these settings make besides their kind's (rl with method rm: reward_model)."""
        return set()

    def check_wiring(self, where: str, ports: set[str]) -> None:
        """Raise ConfigError for settings that cannot work with the input ports the graph
        fills (`ports`; rl's open-ended prompts with no reward model): at graph time."""

    def check_inputs(self, where: str, inputs: dict[str, Any]) -> None:
        """Raise UserError for settings that cannot work with the files of the inputs
        (port -> StageResult; a thinking budget and a tokenizer without <think>): the runner
        calls it once those exist, before the stage's MLflow run opens, and before the
        pipeline's run when they exist already."""


def field_help(cls: type) -> list[dict[str, Any]]:
    """Each field's name, type, default, choices/limit and help: for `llm recipes show` and docs."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        limit = f.metadata.get("limit")
        allowed = ", ".join(map(str, f.metadata.get("choices", ()))) or (limit.words(hints[f.name]) if limit else "")
        rows.append({"name": f.name, "type": _type_name(hints[f.name]), "default": default,
                     "allowed": allowed, "help": f.metadata.get("help", "")})
    return rows


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any"
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if args:
        return f"{typing.get_origin(tp).__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "null" if tp is type(None) else tp.__name__


def _coerce(value: Any, tp: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; take it where a float is expected."""
    if isinstance(value, str) and _accepts(tp, float) and not _accepts(tp, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _accepts(tp: Any, scalar: type) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_accepts(a, scalar) for a in typing.get_args(tp))
    return tp is scalar


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def build(cls: type, given: dict[str, Any], where: str, upstream: dict[str, Any] | None = None):
    """An instance of the settings class `cls` from a recipe's mapping: unknown keys, wrong
    types, values outside their choices or limits, and impossible combinations are one
    ConfigError line each, naming `where` (e.g. "recipe.yaml: stages.pretrain")."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in given.items():
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown setting; valid: {', '.join(sorted(known))}")
        tp, meta = hints[key], known[key].metadata
        value = _coerce(value, tp)
        if not _matches(value, tp):
            raise ConfigError(f"{where}.{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{where}.{key}: {value!r} is not available; choose one of "
                              f"{', '.join(map(str, meta['choices']))}")
        limit = meta.get("limit")
        if limit is not None and value is not None and not limit.test(value):
            raise ConfigError(f"{where}.{key}: expected {limit.words(tp)}, got {value!r}")
        if meta.get("files"):
            for uri in [value] if isinstance(value, str) else value:
                if uri:
                    data_path(uri, f"{where}.{key}")
        values[key] = value
    settings = cls(**values)
    settings.check(where, upstream or {})
    return settings


def as_dict(settings) -> dict[str, Any]:
    return dataclasses.asdict(settings)
