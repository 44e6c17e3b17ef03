"""The stage contract: every stage kind is `run(ctx, settings) -> StageResult`.

A kind is one module under workflows/stages/ declaring `KIND = StageKind(...)`: its typed
settings class (workflows/runner/settings.py), the inputs it takes (ports, each filled by
an instance named in the recipe's `from:` or, by default, the nearest earlier instance
that makes that kind of output) and what it outputs. Its `run` reads its settings, the
outputs of the instances on its ports (`ctx.input_path`) and what they pass on
(`ctx.values`: sequence length, system prompt, model config), writes everything it makes
under `ctx.stage_dir`, and returns the paths and summary metrics. Tracking goes through
`ctx.tracker`, progress through `ctx.progress`. The runner handles the graph,
fingerprints, caching, MLflow runs and model registration, so a stage module stays one
readable function. docs/CONTRACTS.md shows how to add a kind.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

# Stages write files through these (re-exported here): complete on disk or absent.
from llm_lifecycle.models.atomic import atomic_dir, atomic_path, write_json_atomic  # noqa: F401


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2, no traceback."""


# What flows along the graph's edges: each instance outputs one of these, each port takes one.
OUTPUT_TYPES = ("documents", "text", "tokenizer", "shards", "model")


@dataclass(frozen=True)
class Port:
    """An input of a stage kind: `accepts` one output type; `required` unless the stage can
    do without (pretrain without a model starts from random weights); a port with
    `default` False is filled only when `from:` names an instance for it; `unless` names a
    setting that, when set, stands in for the port (sft.init: a model reference); a port
    with `passes` False takes outputs but not the values its source passes on (distill's
    teacher: the student's model config and sequence length are what flow on); `needs` names
    an output its source must make besides its kind's (rl's reward_model: an rl stage whose
    method is rm, see Settings.makes)."""

    name: str
    accepts: str
    required: bool = True
    default: bool = True
    unless: str | None = None
    passes: bool = True
    needs: str | None = None


@dataclass(frozen=True)
class StageKind:
    name: str  # as recipes write it: "extend-context"
    settings: type  # the kind's Settings dataclass
    run: Any  # run(ctx, settings) -> StageResult
    inputs: tuple[Port, ...] = ()
    output: str | None = None  # one of OUTPUT_TYPES, or None (eval, quantize, export feed nothing)
    trains: bool = False  # runs on every torchrun rank (data-parallel training); rank 0 runs the others


@dataclass
class StageResult:
    outputs: dict[str, str] = field(default_factory=dict)  # name -> absolute path
    metrics: dict[str, float] = field(default_factory=dict)
    # For model-making stages: the model directory (our checkpoint layout) to log as an
    # MLflow model and register under the recipe's name.
    model_dir: str | None = None
    # Registered under the instance's name as alias, or `model_alias` instead when what it
    # registers is not its `model` output (rl's method rm: the reward model beside the policy).
    model_alias: str | None = None
    aliases: list[str] = field(default_factory=list)  # more aliases for the same version (rl: its method)
    model_version: list[str] | None = None  # [registered model, version], set by the runner
    # What the user must read, by topic: {"ceval": "not run (no data); ..."}; shown in the summary.
    notes: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StageResult":
        return cls(**data)


class Tracker(Protocol):
    """What a stage may log; the runner's implementation writes to MLflow."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: dict | list, artifact_file: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_input(self, path: str | Path, name: str, context: str) -> None:
        """Record a data file as an MLflow dataset input (with its content hash)."""
        ...


class ProgressTask(Protocol):
    def advance(self, n: float = 1) -> None: ...
    def update(self, *, total: float | None = None, description: str | None = None, info: str | None = None) -> None:
        """`info`: the latest figures shown beside the count (e.g. "loss 5.12, 3,400 tokens/s")."""
        ...


class Progress(Protocol):
    def task(self, description: str, total: float | None = None) -> AbstractContextManager[ProgressTask]: ...
    def log(self, message: str) -> None: ...


@dataclass
class StageContext:
    stage: str  # the instance's name in the recipe ("rl-reasoning")
    kind: str  # its kind ("rl")
    recipe: "Any"  # workflows/runner/recipe.py Recipe: its name, seed and model
    workspace: Path  # the LLM_HOME root (./llm-runs by default)
    stage_dir: Path  # where this stage writes: <workspace>/<recipe>/<instance>/<fingerprint>
    inputs: dict[str, StageResult]  # port name -> the result of the instance on that port
    sources: dict[str, str]  # port name -> that instance's name (for messages)
    values: dict[str, Any]  # what the inputs pass on: seq_len, base_seq_len, system_prompt, model
    tracker: Tracker
    progress: Progress
    seed: int = 0

    def input_path(self, port: str, name: str) -> Path:
        """The path output `name` of the instance on `port`, or a clear error naming what is missing."""
        result = self.inputs.get(port)
        if result is None or name not in result.outputs:
            source = self.sources.get(port, "an earlier stage")
            raise UserError(
                f"stage '{self.stage}' needs output '{name}' of '{source}', which has not run; "
                f"run `llm pipeline {self.recipe.name} --stages {source},{self.stage}`"
            )
        return Path(result.outputs[name])


class _SilentTask:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, *, total: float | None = None, description: str | None = None, info: str | None = None) -> None:
        pass


class SilentProgress:
    """A `Progress` that shows nothing: for library use and tests."""

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[_SilentTask]:
        yield _SilentTask()

    def log(self, message: str) -> None:
        pass
