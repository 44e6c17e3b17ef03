"""Recipes: the YAML that is the experiment.

A recipe names a model preset (with overrides) and its stages: named instances of stage
kinds joined into a graph (workflows/runner/graph.py), each with its kind's typed
settings (workflows/runner/settings.py). Everything is validated before any work starts:
unknown keys, wrong types, impossible model shapes and graph mistakes become one clear
line each (a `ConfigError`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llm_lifecycle.workflows import stages as kinds
from llm_lifecycle.workflows import strict_yaml
from llm_lifecycle.workflows.runner.graph import Instance, build_graph
from llm_lifecycle.workflows.runner.settings import ConfigError, as_dict

RECIPES_DIR = Path(__file__).parents[1] / "recipes"


TOP_LEVEL_KEYS = {"name", "description", "seed", "model", "stages"}


@dataclass
class Recipe:
    name: str
    path: Path
    model: dict[str, Any]  # resolved ModelConfig fields (preset + overrides)
    preset: str
    instances: dict[str, Instance]  # every stage, validated, in the order they run
    seed: int = 0
    description: str = ""
    overrides: list[str] = field(default_factory=list)

    def settings(self, name: str):
        return self.instances[name].settings

    def to_dict(self) -> dict:
        """The fully resolved recipe (preset, overrides and defaults applied), re-runnable as is."""
        stages = {}
        for inst in sorted(self.instances.values(), key=lambda i: i.position):
            section = {"kind": inst.kind} if inst.kind != inst.name else {}
            if inst.written_from is not None:
                section["from"] = inst.written_from
            stages[inst.name] = {**section, **as_dict(inst.settings)}
        return {"name": self.name, "description": self.description, "seed": self.seed,
                "model": {"preset": self.preset, **self.model}, "stages": stages}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def model_config(self):
        from llm_lifecycle.models.config import ModelConfig

        return ModelConfig.from_dict(self.model)


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"recipe file not found: {candidate}")
        return candidate
    path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown recipe '{name_or_path}'; known recipes: {', '.join(list_recipes())} "
            "(or pass a path to a recipe .yaml)"
        )
    return path


def read_yaml(path: Path) -> Any:
    """The recipe file as data: UTF-8, every key of a mapping once (two stages with one name
    are a mistake, not the last one silently winning)."""
    try:
        return strict_yaml.load(strict_yaml.utf8_text(path))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}; fix the file and re-run") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set pretrain.steps=500")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(data: dict, keys: list[str], value: Any) -> None:
    """`pretrain.lr=1e-3` sets stages.pretrain.lr (any stage by its name); `model.dim=512` and
    `seed=1` as written."""
    if keys[0] not in TOP_LEVEL_KEYS:
        keys = ["stages", *keys]
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: '{key}' is not a section")
    node[keys[-1]] = value


# Settings that shape a tokenizer trained from scratch. A pretrained tokenizer is used as
# it is, and extending one keeps its pre-tokenizer and model (so its old ids encode as
# before), so giving them beside either would be silently ignored.
_TRAINING_ONLY = {
    "pretrained": ("split_digits", "whitespace_runs", "byte_fallback", "min_frequency"),
    "extend": ("split_digits", "whitespace_runs", "byte_fallback"),
}


def _tokenizer_from_init(path: Path, sections: dict[str, Any]) -> None:
    """In the default pipeline, a recipe that starts from a model (pretrain.init or sft.init)
    uses that model's tokenizer; one line for tokenizer-training settings that would then be
    silently ignored, and for an extended tokenizer no stage would use."""
    tok, pretrain, sft = (sections.get(name) for name in ("tokenizer-train", "pretrain", "sft"))
    if not all(isinstance(section, dict) for section in (tok, pretrain, sft)):
        return  # the graph rejects a section that is not a mapping, in one line
    pretrain_init, sft_init = pretrain.get("init"), sft.get("init")
    extend, pretrained = tok.get("extend"), tok.get("pretrained")
    if extend is not None and sft_init and not pretrain_init:
        # Extending a tokenizer serves continued pretraining (pretrain.init grows the model's
        # embedding to it, as Chinese-LLaMA did); SFT from its own init never reads it.
        raise ConfigError(
            f"{path}: stages.tokenizer-train.extend: SFT from stages.sft.init ({sft_init}) keeps that "
            "model's tokenizer, so the extended one would go unused; remove extend, or continue pretraining "
            "from the model (stages.pretrain.init) with it"
        )
    if extend is not None and pretrained is not None:
        return  # the stage's settings reject setting both
    if extend is not None:
        mode, ref, source, fix = "extend", extend, "stages.tokenizer-train.extend", "remove {key} or extend"
    elif pretrained is not None:
        mode, ref, source, fix = "pretrained", pretrained, "stages.tokenizer-train.pretrained", "remove {key} or pretrained"
    elif pretrain_init or sft_init:
        ref = pretrain_init or sft_init
        init = "stages.pretrain.init" if pretrain_init else "stages.sft.init"
        mode, source, fix = "pretrained", init, "remove {key} (a model keeps the tokenizer it was trained with)"
    else:
        return
    for key in _TRAINING_ONLY[mode]:
        if key in tok:
            kept = "is extended, keeping its pre-tokenizer and model" if mode == "extend" else "is used as it is"
            raise ConfigError(
                f"{path}: stages.tokenizer-train.{key}: applies only to a tokenizer trained from scratch, "
                f"but the tokenizer of {source} ({ref}) {kept}; {fix.format(key=key)}"
            )
    if mode == "pretrained":
        tok["pretrained"] = ref


def _resolve_model(recipe_file: Path, section: Any, vocab_size: int | None) -> tuple[str, dict]:
    """(preset name, ModelConfig fields): the preset with the recipe's overrides; the
    vocabulary is the tokenizer's (`vocab_size`), or the preset's when None."""
    from llm_lifecycle.models.config import ModelConfig
    from llm_lifecycle.models.presets import list_presets, load_preset

    if not isinstance(section, dict) or "preset" not in section:
        raise ConfigError(f"{recipe_file}: model: expected a mapping with 'preset' (one of {', '.join(list_presets())})")
    overrides = dict(section)
    preset = overrides.pop("preset")
    try:
        fields = {**load_preset(preset), **overrides}
    except ValueError as err:
        raise ConfigError(f"{recipe_file}: model.preset: {err}") from None
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size  # the model's vocabulary is the tokenizer's
    try:
        cfg = ModelConfig.from_dict(fields)
        cfg.validate()
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{recipe_file}: model: {err}") from None
    return preset, cfg.to_dict()


# The name becomes an MLflow experiment, a registered model and a workspace folder.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _check_name(path: Path, name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"{path}: name: expected letters, digits, '.', '_' or '-' (at most 100, "
                          f"starting with a letter or digit), got {name!r}")
    return name


def _stage_sections(path: Path, data: dict) -> dict[str, Any]:
    """The recipe's stages, in order. A recipe that names only the default pipeline's kinds
    (and gives no `kind:`) runs that whole pipeline, its missing stages with their defaults."""
    given = data.get("stages")
    given = {} if given is None else given
    if not isinstance(given, dict):
        raise ConfigError(f"{path}: stages: expected a mapping of stage name to settings")
    straight = all(name in kinds.DEFAULT_CHAIN and not (isinstance(s, dict) and "kind" in s) for name, s in given.items())
    if not straight:
        return dict(given)
    sections = {name: _copy_section(given.get(name, {})) for name in kinds.DEFAULT_CHAIN}
    _tokenizer_from_init(path, sections)
    return _pruned_by_init(sections)


def _copy_section(section: Any) -> Any:
    """A stage's section to fill in (None: all defaults); anything but a mapping is left for
    the graph to reject in one line."""
    if section is None:
        return {}
    return dict(section) if isinstance(section, dict) else section


def _pruned_by_init(sections: dict[str, Any]) -> dict[str, Any]:
    """The default pipeline without its model-making stages before a stage that starts from
    `init`: nothing would use their models (`llm pipeline R --init ./folder`)."""
    names = list(sections)
    starts = [i for i, n in enumerate(names) if isinstance(sections[n], dict) and sections[n].get("init")]
    if not starts:
        return sections
    dropped = {n for n in names[: max(starts)] if kinds.kind(n).output == "model"}
    return {n: s for n, s in sections.items() if n not in dropped}


def _kind_of(name: str, section: Any) -> str:
    kind = section.get("kind", name) if isinstance(section, dict) else name
    return kind if kind in kinds.MODULES else name


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = recipe_path(name_or_path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        keys, value = _parse_override(item)
        _apply_override(data, keys, value)
    unknown = set(data) - TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(TOP_LEVEL_KEYS))}"
        )
    sections = _stage_sections(path, data)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"{path}: seed: expected an integer from 0 to 2**32-1, got {seed!r}")
    # The model's vocabulary is the tokenizer's: the first tokenizer-train stage that sizes
    # it sets both; otherwise every tokenizer takes the preset's size (llama3-small: 4x).
    tokenizers = [s for n, s in sections.items() if isinstance(s, dict) and _kind_of(n, s) == "tokenizer-train"]
    sized = next((s["vocab_size"] for s in tokenizers if "vocab_size" in s), None)
    if sized is not None and (isinstance(sized, bool) or not isinstance(sized, int) or sized < 260):
        raise ConfigError(f"{path}: stages.tokenizer-train.vocab_size: expected an integer >= 260, got {sized!r}")
    preset, model = _resolve_model(path, data.get("model"), sized)
    for tok in tokenizers:
        tok.setdefault("vocab_size", model["vocab_size"])
    instances = build_graph(path, sections, {"model": model, "seq_len": model["max_seq_len"],
                                                            "base_seq_len": model["max_seq_len"]})
    return Recipe(
        name=_check_name(path, data.get("name", path.stem)),
        path=path,
        model=model,
        preset=preset,
        instances=instances,
        seed=seed,
        description=str(data.get("description", "")),
        overrides=list(overrides),
    )
