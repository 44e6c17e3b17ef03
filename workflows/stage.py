"""The stage contract: every stage is `run(ctx, cfg) -> StageResult`.

A stage reads its validated config section (`cfg`, a plain dict), the outputs of the
stages before it (`ctx.upstream`), writes everything it makes under `ctx.stage_dir`, and
returns the paths and summary metrics. Tracking goes through `ctx.tracker`, progress
through `ctx.progress`. The runner handles fingerprints, caching, MLflow runs and model
registration, so a stage module stays one readable function.
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


def reject_unknown_settings(section: str, cfg: dict, known: set[str]) -> None:
    """One line naming the first setting of `section` (e.g. "stages.data-clean") not in `known`."""
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise UserError(f"{section}.{unknown[0]}: unknown setting; valid: {', '.join(sorted(known))}")


@dataclass
class StageResult:
    outputs: dict[str, str] = field(default_factory=dict)  # name -> absolute path
    metrics: dict[str, float] = field(default_factory=dict)
    # For model-making stages: the model directory (our checkpoint layout) to log as an
    # MLflow model and register under the recipe's name with `model_alias` as alias.
    model_dir: str | None = None
    model_alias: str | None = None
    aliases: list[str] = field(default_factory=list)  # more aliases for the same version (rl: "rl")

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
    def update(self, *, total: float | None = None, description: str | None = None) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: float | None = None) -> AbstractContextManager[ProgressTask]: ...
    def log(self, message: str) -> None: ...


@dataclass
class StageContext:
    stage: str
    recipe: "Any"  # workflows.recipe.Recipe: name, model config dict, every stage's config
    workspace: Path  # the LLM_HOME root (./llm-runs by default)
    stage_dir: Path  # where this stage writes: <workspace>/<recipe>/<stage>/<fingerprint>
    upstream: dict[str, StageResult]  # completed results of earlier stages, by stage name
    tracker: Tracker
    progress: Progress
    seed: int = 0

    def upstream_output(self, stage: str, name: str) -> Path:
        """The path an earlier stage produced, or a clear error naming what is missing."""
        result = self.upstream.get(stage)
        if result is None or name not in result.outputs:
            raise UserError(
                f"stage '{self.stage}' needs output '{name}' of stage '{stage}', which has not run; "
                f"run `llm pipeline {self.recipe.name} --stages {stage},{self.stage}`"
            )
        return Path(result.outputs[name])


class _SilentTask:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, *, total: float | None = None, description: str | None = None) -> None:
        pass


class SilentProgress:
    """A `Progress` that shows nothing: for library use and tests."""

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[_SilentTask]:
        yield _SilentTask()

    def log(self, message: str) -> None:
        pass
