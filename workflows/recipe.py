"""Recipes: the YAML that is the experiment.

A recipe names a model preset (with overrides) and each stage's settings. Everything is
validated before any work starts: unknown keys, wrong types and impossible model shapes
become one clear line each (a `ConfigError`).
"""

from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llm_lifecycle.workflows.data import parse_sources
from llm_lifecycle.workflows.stage import UserError

RECIPES_DIR = Path(__file__).parent / "recipes"
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ~10x faster


class ConfigError(UserError):
    pass


# Every stage's settings with their defaults; the type of each default is the type a
# recipe must give (an int is accepted where a float is expected). `None` accepts anything.
_TRAIN = {
    "steps": 200,
    "batch_size": 8,
    "seq_len": 256,
    "grad_accum": 1,
    "lr": 1e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 20,
    "weight_decay": 0.1,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-8,
    "grad_clip": 1.0,
    "checkpoint_every": 50,
    "keep_checkpoints": 2,  # the newest K checkpoints stay on disk
    "log_every": 10,
    "precision": "auto",  # auto: bf16 autocast where bf16 is native (GPUs, CPUs with AMX/AVX512-BF16), else fp32
    "compile": False,  # torch.compile the model (falls back to eager if compiling fails)
    "activation_checkpointing": False,  # recompute block activations in backward: less memory
}

# Held-out answer accuracy before and after sft/rl: greedy exact match of the final number
# on GSM8K-format problems ("" = not measured); max_new_tokens also bounds rl's samples.
_ANSWER_EVAL = {"eval_data": "", "eval_n": 200, "max_new_tokens": 96}

STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "data-fetch": {"sources": [{"uri": "builtin:corpus"}]},
    "data-clean": {
        "min_chars": 50,
        "max_chars": 100_000,
        "rules": True,
        "exact_dedup": True,
        "minhash_dedup": True,
        "minhash_threshold": 0.8,
        "minhash_num_perm": 128,
        "holdout_fraction": 0.02,
        "languages": [],  # keep only these languages (ISO 639-1, e.g. [en, zh]); []: no language id
        "engine": "local",  # or datatrove: the same steps on datatrove's executors
        "datatrove_tasks": 2,
    },
    "tokenizer-train": {
        "vocab_size": 4096,
        "min_frequency": 2,
        "split_digits": True,
        "whitespace_runs": 0,
        "byte_fallback": False,
        "special_tokens": [],
        "extend": None,
        "pretrained": None,
    },
    "tokenize": {"shard_tokens": 1 << 20, "workers": 0},  # 0: one worker process per CPU core
    "pretrain": {
        **_TRAIN,
        "objective": "causal",  # or glm_blank_infilling (GLM; the model needs rope_2d: true)
        "glm_mask_ratio": 0.15,  # share of each window cut out as blanks
        "glm_mean_span": 3.0,  # Poisson mean of a blank's length
        "schedule": [],  # data phases (mixtures of data-fetch groups): workflows/mixture.py
        # start from this model (a Hugging Face folder or hub id, models:/..., our folder) instead of random weights
        "init": None,
    },
    "extend-context": {
        **_TRAIN,
        "steps": 40,
        "seq_len": 512,
        "lr": 3e-4,
        "warmup_steps": 5,
        "rope_theta": 100_000.0,
        "rope_scaling": None,  # e.g. {"type": "yarn", "factor": 2.0}; types: linear, ntk, dynamic, yarn, llama3
        "logn": False,  # LogN attention scaling past the pretraining length (Qwen)
        "eval_windows": 16,
        "eval_lengths": None,  # perplexity at these lengths too (default: twice seq_len)
        "passkey_trials": 8,  # passkey-retrieval probe at seq_len (0: off)
        "schedule": [],  # e.g. [{until: 1.0, mixture: {long: 0.7, general: 0.3}, min_doc_tokens: 512}]
    },
    "sft": {
        **_TRAIN,
        "steps": 60,
        "lr": 3e-4,
        "warmup_steps": 6,
        "data": ["builtin:chat/en_dolly_hhrlhf_train_small.jsonl", "builtin:chat/zh_oasst1_sft_zh.json"],
        "max_examples": 2000,
        "system_prompt": "You are a helpful assistant.",
        "init": None,  # fine-tune this model (as pretrain.init) instead of extend-context's
        "packing": False,  # several chats per row, each attending only to itself
        "lora_rank": 0,  # > 0: train rank-r LoRA adapters on the projections, merged into the saved model
        "lora_alpha": 16.0,
        **_ANSWER_EVAL,
    },
    "rl": {
        **_TRAIN,
        "method": "dpo",
        "steps": 40,
        "batch_size": 4,
        "lr": 1e-4,
        "warmup_steps": 4,
        "beta": 0.1,
        "sft_weight": 0.0,
        "data": ["builtin:chat/en_hh_rlhf_harmless-base_test.jsonl.gz", "builtin:chat/zh_oasst1_rm_zh.json"],
        "max_pairs": 2000,
        "heldout_pairs": 64,
        "rm_margin": 0.5,  # rm: ranking loss -log σ(r_chosen - r_rejected - margin) (Llama 2)
        # ppo, grpo, rs-sft: GSM8K-format problems, rewarded for the exact final number and the format
        "problems": ["builtin:arith/train.jsonl.gz"],
        "group_size": 8,  # samples per prompt (batch_size prompts per step)
        "temperature": 1.0,
        "top_p": 1.0,
        "kl_coef": 0.04,  # KL to the frozen reference (Qwen's PPO; DeepSeekMath's GRPO)
        "format_reward": 0.2,  # paid for ending with a '#### N' line; a right answer pays 1
        "clip": 0.2,
        "ppo_epochs": 2,
        "gamma": 1.0,
        "gae_lambda": 0.95,
        "vf_coef": 0.5,
        "rs_prompts": 256,
        **_ANSWER_EVAL,
    },
    "eval": {
        "suites": ["mmlu", "gsm8k"],
        "data_dir": "builtin",  # "builtin" = the small offline mirror shipped; "hub" = Hugging Face
        "limit": 20,
        "num_fewshot": None,
        "batch_size": 8,
        "max_gen_toks": 64,
    },
    # method rtn | gptq | awq; bits 8 | 4; group_size 0 = one scale per output row
    "quantize": {"method": "rtn", "bits": 8, "group_size": 128, "calib_windows": 32, "eval_windows": 32},
    # format auto (hf when transformers has the layout, else ours) | hf | gguf | safetensors (ours);
    # gguf_type f32 | f16 | q8_0 | q4_0 (GGUF only)
    "export": {"format": "auto", "verify": True, "gguf_type": "q8_0"},
}

STAGE_ORDER = list(STAGE_DEFAULTS)

# What a value must be beyond its type, by setting name (the same name means the same
# thing in every stage): (test, what to tell the user).
_AT_LEAST_1 = (lambda v: v >= 1, "an integer >= 1")
_POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_FRACTION = (lambda v: 0 <= v <= 1, "a number from 0 to 1")
_LIMITS: dict[str, tuple[Any, str]] = {
    **{k: _AT_LEAST_1 for k in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints",
                                "log_every", "minhash_num_perm", "min_frequency", "shard_tokens", "eval_windows",
                                "max_examples", "max_pairs", "heldout_pairs", "limit", "max_gen_toks", "calib_windows")},
    "seq_len": (lambda v: v >= 2, "an integer >= 2 (an input and its next-token target)"),
    "vocab_size": (lambda v: v >= 260, "an integer >= 260 (256 byte tokens plus the special tokens)"),
    **{k: _POSITIVE for k in ("lr", "eps", "grad_clip", "rope_theta", "beta")},
    **{k: _NON_NEGATIVE for k in ("weight_decay", "sft_weight", "warmup_steps", "min_chars", "max_chars", "workers",
                                  "group_size")},
    "min_lr_ratio": _FRACTION,
    "minhash_threshold": (lambda v: 0 < v <= 1, "a number above 0 and at most 1"),
    "holdout_fraction": (lambda v: 0 < v < 1, "a number between 0 and 1"),
    "beta1": (lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1"),
    "beta2": (lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1"),
    "num_fewshot": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                    "empty (the suite's default) or an integer >= 0"),
    "data": (lambda v: bool(v) and all(isinstance(x, str) and x for x in v), "a non-empty list of file names"),
    "suites": (lambda v: bool(v) and all(isinstance(x, str) and x for x in v), "a non-empty list of suite names"),
}


@functools.cache
def _choices() -> dict[tuple[str, str], tuple]:
    """Settings that take one of a few values; the stage modules own the lists (imported
    here, lazily: they bring torch)."""
    from llm_lifecycle.models.quantize import BITS
    from llm_lifecycle.models.quantize import METHODS as QUANT_METHODS
    from llm_lifecycle.workflows.export import FORMATS
    from llm_lifecycle.workflows.rl import METHODS as RL_METHODS

    return {
        **{(stage, "precision"): ("auto", "fp32", "bf16") for stage in ("pretrain", "extend-context", "sft", "rl")},
        ("rl", "method"): RL_METHODS,
        ("quantize", "method"): QUANT_METHODS,
        ("quantize", "bits"): BITS,
        ("export", "format"): FORMATS,
    }
TOP_LEVEL_KEYS = {"name", "description", "seed", "model", "stages"}


@dataclass
class Recipe:
    name: str
    path: Path
    model: dict[str, Any]  # resolved ModelConfig fields (preset + overrides)
    preset: str
    stages: dict[str, dict[str, Any]]  # every stage's full config (defaults filled in)
    seed: int = 0
    description: str = ""
    overrides: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The fully resolved recipe (preset, overrides and defaults applied), re-runnable as is."""
        return {"name": self.name, "description": self.description, "seed": self.seed,
                "model": {"preset": self.preset, **self.model}, "stages": self.stages}

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
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_SAFE_LOADER)
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
    """`pretrain.lr=1e-3` sets stages.pretrain.lr; `model.dim=512` and `seed=1` as written."""
    if keys[0] in STAGE_DEFAULTS:
        keys = ["stages", *keys]
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: '{key}' is not a section")
    node[keys[-1]] = value


# Settings that take either their default's type or a mapping (rules: true, or its thresholds).
MAPPING_OR_DEFAULT = {("data-clean", "rules")}


def _check_type(where: str, value: Any, default: Any) -> None:
    if default is None or value is None and default is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"{where}: expected {type(default).__name__}, got {type(value).__name__} {value!r}"
        )


def _coerce_number(value: Any, default: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; accept it where a float is expected."""
    if isinstance(default, float) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _merge_stage(recipe_file: Path, stage: str, given: Any) -> dict[str, Any]:
    defaults = STAGE_DEFAULTS[stage]
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigError(f"{recipe_file}: stages.{stage}: expected a mapping of settings")
    merged = copy.deepcopy(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise ConfigError(
                f"{recipe_file}: stages.{stage}.{key}: unknown setting; "
                f"valid: {', '.join(sorted(defaults))}"
            )
        value = _coerce_number(value, defaults[key])
        where = f"{recipe_file}: stages.{stage}.{key}"
        if (stage, key) not in MAPPING_OR_DEFAULT or not isinstance(value, dict):
            _check_type(where, value, defaults[key])
            _check_value(where, stage, key, value)
        merged[key] = value
    return merged


def _check_value(where: str, stage: str, key: str, value: Any) -> None:
    choices = _choices().get((stage, key))
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not available; choose one of {', '.join(map(str, choices))}")
    limit = _LIMITS.get(key)
    if limit is not None and not limit[0](value):
        raise ConfigError(f"{where}: expected {limit[1]}, got {value!r}")


def _check_across_stages(path: Path, stages: dict[str, dict[str, Any]]) -> None:
    clean = stages["data-clean"]
    if clean["max_chars"] < clean["min_chars"]:
        raise ConfigError(f"{path}: stages.data-clean.max_chars ({clean['max_chars']}) is below min_chars "
                          f"({clean['min_chars']}); no document could pass")
    short, long = stages["pretrain"]["seq_len"], stages["extend-context"]["seq_len"]
    if long <= short:
        raise ConfigError(f"{path}: stages.extend-context.seq_len ({long}) must exceed pretrain.seq_len ({short})")


# Settings that shape a tokenizer trained from scratch. A pretrained tokenizer is used as
# it is, and extending one keeps its pre-tokenizer and model (so its old ids encode as
# before), so giving them beside either would be silently ignored.
_TRAINING_ONLY = {
    "pretrained": ("split_digits", "whitespace_runs", "byte_fallback", "min_frequency"),
    "extend": ("split_digits", "whitespace_runs", "byte_fallback"),
}


def _check_extend_with_init(path: Path, stages: dict[str, dict[str, Any]]) -> None:
    """Extending a tokenizer serves continued pretraining (pretrain.init grows the model's
    embedding to it, as Chinese-LLaMA did); SFT from its own init never reads it."""
    if stages["tokenizer-train"]["extend"] is not None and stages["sft"]["init"] and not stages["pretrain"]["init"]:
        raise ConfigError(
            f"{path}: stages.tokenizer-train.extend: SFT from stages.sft.init ({stages['sft']['init']}) keeps that "
            "model's tokenizer, so the extended one would go unused; remove extend, or continue pretraining "
            "from the model (stages.pretrain.init) with it"
        )


def _check_tokenizer_source(path: Path, stages: dict[str, dict[str, Any]], given: dict[str, Any]) -> None:
    """One line for a tokenizer-training setting the recipe gives beside a tokenizer not trained here."""
    tok = stages["tokenizer-train"]
    if tok["extend"] is not None and tok["pretrained"] is not None:
        return  # the stage rejects setting both
    if tok["extend"] is not None:
        mode, source, fix = "extend", "stages.tokenizer-train.extend", "remove {key} or extend"
    elif given.get("pretrained") is not None:
        mode, source, fix = "pretrained", "stages.tokenizer-train.pretrained", "remove {key} or pretrained"
    elif tok["pretrained"] is not None:  # taken from the model the recipe starts from
        init = "stages.pretrain.init" if stages["pretrain"]["init"] else "stages.sft.init"
        mode, source, fix = "pretrained", init, "remove {key} (a model keeps the tokenizer it was trained with)"
    else:
        return
    for key in _TRAINING_ONLY[mode]:
        if key in given:
            kept = "is extended, keeping its pre-tokenizer and model" if mode == "extend" else "is used as it is"
            raise ConfigError(
                f"{path}: stages.tokenizer-train.{key}: applies only to a tokenizer trained from scratch, "
                f"but the tokenizer of {source} ({tok[mode]}) {kept}; {fix.format(key=key)}"
            )


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


def _check_extension(path: Path, model: dict[str, Any], stages: dict[str, dict[str, Any]]) -> None:
    """The extended model extend-context will build must be a valid one."""
    from llm_lifecycle.models.config import ModelConfig

    ext = stages["extend-context"]
    scaling = ext["rope_scaling"]
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{path}: stages.extend-context.rope_scaling: expected a mapping "
                          f"(e.g. {{type: yarn, factor: 2.0}}) or null, got {scaling!r}")
    if scaling is not None:
        scaling = {"original_max_seq_len": stages["pretrain"]["seq_len"], **scaling}
    try:
        ModelConfig.from_dict({**model, "rope_theta": float(ext["rope_theta"]), "rope_scaling": scaling,
                               "max_seq_len": ext["seq_len"]}).validate()
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: stages.extend-context: {err}") from None


OBJECTIVES = ("causal", "glm_blank_infilling")


def _check_objective(recipe_file: Path, pretrain: dict, model: dict) -> None:
    objective = pretrain["objective"]
    if objective not in OBJECTIVES:
        raise ConfigError(f"{recipe_file}: stages.pretrain.objective: '{objective}' is not one of {', '.join(OBJECTIVES)}")
    if objective == "glm_blank_infilling" and not model["rope_2d"]:
        raise ConfigError(
            f"{recipe_file}: stages.pretrain.objective glm_blank_infilling needs GLM's 2D positions; "
            "set model.rope_2d: true (as the chatglm-small preset does)"
        )
    if not 0 < pretrain["glm_mask_ratio"] < 0.5 or not pretrain["glm_mean_span"] >= 1:
        raise ConfigError(f"{recipe_file}: stages.pretrain: need 0 < glm_mask_ratio < 0.5 and glm_mean_span >= 1")


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
    stages_given = data.get("stages")
    stages_given = {} if stages_given is None else stages_given
    if not isinstance(stages_given, dict):
        raise ConfigError(f"{path}: stages: expected a mapping of stage name to settings")
    for stage in stages_given:
        if stage not in STAGE_DEFAULTS:
            raise ConfigError(f"{path}: stages.{stage}: unknown stage; stages are {', '.join(STAGE_ORDER)}")
    stages = {s: _merge_stage(path, s, stages_given.get(s)) for s in STAGE_ORDER}
    _check_across_stages(path, stages)
    _check_extend_with_init(path, stages)
    tok = stages["tokenizer-train"]
    if tok["pretrained"] is None and tok["extend"] is None:  # a recipe that starts from a model uses its tokenizer
        tok["pretrained"] = stages["pretrain"]["init"] or stages["sft"]["init"]
    _check_tokenizer_source(path, stages, stages_given.get("tokenizer-train") or {})
    seed = data.get("seed", 0)
    _check_type(f"{path}: seed", seed, 0)
    if not 0 <= seed < 2**32:
        raise ConfigError(f"{path}: seed: expected an integer from 0 to 2**32-1, got {seed}")
    # A recipe that does not size its tokenizer takes the preset's vocabulary (llama3-small: 4x).
    tokenizer_sized = "vocab_size" in (stages_given.get("tokenizer-train") or {})
    preset, model = _resolve_model(path, data.get("model"), stages["tokenizer-train"]["vocab_size"] if tokenizer_sized else None)
    stages["tokenizer-train"]["vocab_size"] = model["vocab_size"]
    _check_objective(path, stages["pretrain"], model)
    _check_extension(path, model, stages)
    parse_sources(stages["data-fetch"])  # a bad source is a one-line error now, not mid-pipeline
    return Recipe(
        name=_check_name(path, data.get("name", path.stem)),
        path=path,
        model=model,
        preset=preset,
        stages=stages,
        seed=seed,
        description=str(data.get("description", "")),
        overrides=list(overrides),
    )
