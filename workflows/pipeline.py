"""The pipeline runner: plans stages, reuses completed ones, runs the rest as MLflow runs.

Each stage's fingerprint hashes (stage name, its config, the model config when the stage
uses a model, the seed, upstream fingerprints, the package version). A stage whose
`result.json` exists for that fingerprint is reused; a stage directory without one is a
stage that died half-way, and the stage resumes from its own checkpoints there; its new
MLflow run links to the run that died (`llm.resumes_run`), as the new pipeline run links
to the pipeline run that died.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from llm_lifecycle import __version__
from llm_lifecycle.registry.hardware import is_main_process
from llm_lifecycle.workflows.distributed import barrier
from llm_lifecycle.workflows.recipe import STAGE_ORDER, Recipe
from llm_lifecycle.workflows.stage import (
    Progress,
    StageContext,
    StageResult,
    UserError,
    write_json_atomic,
)


@dataclass(frozen=True)
class StageSpec:
    name: str
    entry: str  # "module:function" under llm_lifecycle.workflows
    upstream: tuple[str, ...]
    uses_model: bool = False
    alias: str | None = None  # registry alias for the model this stage makes (or the result's model_alias)


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec("data-fetch", "data:fetch", ()),
        StageSpec("data-clean", "data:clean", ("data-fetch",)),
        StageSpec("tokenizer-train", "tokenizer:train_tokenizer", ("data-clean",)),
        StageSpec("tokenize", "tokenizer:tokenize", ("data-clean", "tokenizer-train")),
        StageSpec("pretrain", "pretrain:run", ("tokenizer-train", "tokenize"), True, "pretrain"),
        StageSpec("extend-context", "extend_context:run", ("pretrain", "tokenize"), True, "extend-context"),
        StageSpec("sft", "sft:run", ("extend-context",), True, "sft"),
        StageSpec("rl", "rl:run", ("sft",), True, "rl"),
        StageSpec("eval", "evaluate:run", ("rl", "tokenize"), True),
        StageSpec("quantize", "quantize:run", ("rl", "tokenize"), True),  # alias int<bits>, from the result
        StageSpec("export", "export:run", ("rl",), True),
    ]
}
assert list(STAGES) == STAGE_ORDER
# Stages that run on every torchrun rank (data-parallel training); rank 0 runs the others.
TRAINING_STAGES = ("pretrain", "extend-context", "sft", "rl")


@dataclass
class PlannedStage:
    name: str
    fingerprint: str
    directory: Path
    selected: bool  # asked for in this invocation
    cached: bool  # a completed result exists for this fingerprint

    @property
    def result_file(self) -> Path:
        return self.directory / "result.json"

    @property
    def will_run(self) -> bool:
        return self.selected and not self.cached


def stage_upstream(recipe: Recipe, name: str) -> tuple[str, ...]:
    """The stages `name` needs: one that starts from an `init` model needs no earlier model."""
    upstream = STAGES[name].upstream
    if recipe.stages[name].get("init"):
        return tuple(u for u in upstream if not STAGES[u].uses_model)
    return upstream


def _replaced_by_init(recipe: Recipe) -> set[str]:
    """Model-making stages before a stage that starts from `init`: nothing would use their model."""
    starts = [i for i, s in enumerate(STAGE_ORDER) if recipe.stages[s].get("init")]
    return {s for s in STAGE_ORDER[: max(starts, default=0)] if STAGES[s].uses_model}


def fingerprints(recipe: Recipe) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in STAGE_ORDER:
        spec = STAGES[name]
        payload = {
            "stage": name,
            "config": recipe.stages[name],
            "model": recipe.model if spec.uses_model and not recipe.stages[name].get("init") else None,
            "seed": recipe.seed,
            "upstream": [out[u] for u in stage_upstream(recipe, name)],
            "version": __version__,
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        out[name] = hashlib.sha256(blob).hexdigest()[:16]
    return out


def _parse_stage_list(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    for n in names:
        if n not in STAGES:
            raise UserError(f"unknown stage '{n}'; stages are {', '.join(STAGE_ORDER)}")
    return names


def plan(
    recipe: Recipe,
    workspace: Path,
    stages: str | list[str] | None = None,
    from_stage: str | None = None,
    force: tuple[str, ...] = (),
) -> list[PlannedStage]:
    chosen = _parse_stage_list(stages) if isinstance(stages, str) or stages is None else list(stages)
    _parse_stage_list(",".join(force))
    if from_stage is not None:
        _parse_stage_list(from_stage)
        start = STAGE_ORDER.index(from_stage)
        chosen = [s for s in (chosen or STAGE_ORDER) if STAGE_ORDER.index(s) >= start]
    chosen = [s for s in chosen or STAGE_ORDER if s not in _replaced_by_init(recipe)]
    # Forcing a stage re-runs everything after it that depends on it, as make would.
    force = tuple(s for s in STAGE_ORDER if s in force or set(_all_upstream(s)) & set(force))
    fps = fingerprints(recipe)
    planned = []
    for name in STAGE_ORDER:
        directory = workspace / recipe.name / name / fps[name]
        done = (directory / "result.json").is_file() and name not in force
        planned.append(PlannedStage(name, fps[name], directory, name in chosen, done))
    _check_upstream(recipe, planned)
    return planned


def _check_upstream(recipe: Recipe, planned: list[PlannedStage]) -> None:
    by_name = {p.name: p for p in planned}
    for p in planned:
        if not p.will_run:
            continue
        for up in stage_upstream(recipe, p.name):
            u = by_name[up]
            if not (u.cached or u.selected):
                raise UserError(
                    f"stage '{p.name}' needs stage '{up}', which has not completed for this "
                    f"configuration; include it: --stages {up},{p.name} (or run the whole pipeline)"
                )


def _stage_function(spec: StageSpec) -> Callable[[StageContext, dict], StageResult]:
    module_name, func = spec.entry.split(":")
    module = importlib.import_module(f"llm_lifecycle.workflows.{module_name}")
    return getattr(module, func)


@dataclass(frozen=True)
class SweepMember:
    """Where a pipeline sits in a sweep: nested under the sweep's run, its models registered
    under their own name so the variants' aliases do not overwrite each other."""

    parent_run_id: str
    variant: str  # e.g. "model.position=alibi"
    registered_name: str


def run_pipeline(
    recipe: Recipe,
    workspace: Path,
    progress: Progress,
    stages: str | list[str] | None = None,
    from_stage: str | None = None,
    force: tuple[str, ...] = (),
    sweep: SweepMember | None = None,
) -> dict[str, StageResult]:
    """Run the planned stages under one parent MLflow run; returns every stage's result."""
    from llm_lifecycle.registry import tracking

    planned = plan(recipe, workspace, stages, from_stage, force)
    tracking.configure(workspace)
    results: dict[str, StageResult] = {}
    ran = [p.name for p in planned if p.will_run]
    base_tags = {"llm.recipe": recipe.name, "llm.version": __version__}
    if sweep is not None:
        base_tags |= {"llm.sweep": sweep.parent_run_id, "llm.variant": sweep.variant}
    parent_tags = {**base_tags, "llm.stage": "pipeline"}
    interrupted = [a for p in planned if p.will_run and is_main_process() and (a := _previous_attempt(recipe, p))]
    if interrupted and interrupted[0].parent_run_id:
        parent_tags["llm.resumes_run"] = interrupted[0].parent_run_id
    run_name = f"pipeline [{sweep.variant}]" if sweep else "pipeline"
    with tracking.start_run(recipe.name, run_name, parent_tags,
                            parent_run_id=sweep.parent_run_id if sweep else None) as parent:
        parent.log_params({"recipe": str(recipe.path), "preset": recipe.preset, "seed": recipe.seed,
                           "overrides": recipe.overrides, "stages_run": ran})
        parent.log_params({"model": recipe.model})
        parent.log_dict(recipe.to_dict(), "recipe.yaml")  # redacted as a structure, then written as YAML
        registered_name = sweep.registered_name if sweep else recipe.name
        for p in planned:
            if not p.cached and p.selected and not is_main_process() and p.name not in TRAINING_STAGES:
                barrier()  # under torchrun rank 0 alone runs the data and evaluation stages
                results[p.name] = StageResult.from_json(json.loads(p.result_file.read_text())["result"])
                continue
            if p.cached:
                results[p.name] = StageResult.from_json(json.loads(p.result_file.read_text())["result"])
                if p.selected:
                    progress.log(f"[dim]{p.name}: reused ({p.fingerprint})[/dim]")
                continue
            if not p.selected:
                continue
            with _stage_lock(recipe, p):
                results[p.name] = _run_stage(recipe, workspace, p, results, progress, parent, base_tags,
                                             registered_name)
            barrier()  # the next stage on any rank reads what this one wrote
        for name, result in results.items():
            parent.log_metrics({f"{name}.{k}": v for k, v in result.metrics.items()})
        # The run's description in the MLflow UI: what each stage did, at a glance.
        parent.set_tags({"mlflow.note.content": stage_summary(planned, results)})
    return results


def stage_summary(planned: list[PlannedStage], results: dict[str, StageResult]) -> str:
    """A Markdown table: each stage, whether it ran or was reused, and its first metrics."""
    lines = ["| stage | status | key metrics |", "|---|---|---|"]
    for p in planned:
        if p.name not in results:
            continue
        status = "reused" if p.cached else "ran"
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(results[p.name].metrics.items())[:4])
        lines.append(f"| {p.name} | {status} | {shown} |")
    return "\n".join(lines)


def _run_stage(recipe, workspace, p: PlannedStage, results, progress, parent, base_tags, registered_name) -> StageResult:
    from llm_lifecycle.registry import tracking

    spec = STAGES[p.name]
    tags = {**base_tags, "llm.stage": p.name, "llm.fingerprint": p.fingerprint,
            "llm.parent_stage": ",".join(spec.upstream)}
    if is_main_process():
        previous = _previous_attempt(recipe, p)
        if previous:
            tags["llm.resumes_run"] = previous.run_id
        if p.result_file.exists():
            shutil.rmtree(p.directory)  # --force: start the stage afresh, not from old checkpoints
        p.directory.mkdir(parents=True, exist_ok=True)
    if p.name in TRAINING_STAGES:
        barrier()  # every rank trains; none starts before rank 0 has made the stage directory
    progress.log(f"[bold]{p.name}[/bold] ({p.fingerprint})")
    with tracking.start_run(recipe.name, p.name, tags, parent_run_id=parent.run_id) as tracker:
        _seed_everything(recipe.seed)
        tracker.log_params(recipe.stages[p.name])
        if spec.uses_model:
            tracker.log_params({"model": recipe.model})
        ctx = StageContext(
            stage=p.name,
            recipe=recipe,
            workspace=workspace,
            stage_dir=p.directory,
            upstream={u: results[u] for u in _all_upstream(p.name) if u in results},
            tracker=tracker,
            progress=progress,
            seed=recipe.seed,
        )
        result = _stage_function(spec)(ctx, recipe.stages[p.name])
        if not is_main_process():
            return result
        tracker.log_metrics(result.metrics)
        version = None
        alias = result.model_alias or spec.alias
        if result.model_dir and alias:
            lineage = {**base_tags, "llm.stage": p.name, "llm.fingerprint": p.fingerprint,
                       "llm.source_run": tracker.run_id, "llm.parent_stage": ",".join(spec.upstream)}
            aliases = [alias, *result.aliases]
            version = tracking.log_and_register_model(tracker, result.model_dir, registered_name, aliases, lineage)
            result.model_alias = alias
            progress.log(f"  registered models:/{registered_name}@{'|'.join(aliases)} (version {version})")
    write_json_atomic(p.result_file, {"result": result.to_json(), "run_id": tracker.run_id,
                                      "model_version": version, "fingerprint": p.fingerprint})
    return result


@contextmanager
def _stage_lock(recipe: Recipe, p: PlannedStage) -> Iterator[None]:
    """Hold an exclusive lock on the stage's directory while it runs: a second `llm` on the
    same workspace and configuration is refused instead of writing the same files. The OS
    drops the lock when the holder dies, even by SIGKILL."""
    import fcntl

    if not is_main_process():  # torchrun ranks share rank 0's hold
        yield
        return
    p.directory.parent.mkdir(parents=True, exist_ok=True)
    with open(p.directory.parent / f".{p.fingerprint}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"stage '{p.name}' of recipe {recipe.name} ({p.fingerprint}) is being run by another llm process "
                "on this workspace; wait for it to finish (then re-run to reuse its result) or set another LLM_HOME"
            ) from None
        yield


def _previous_attempt(recipe: Recipe, p: PlannedStage):
    """The MLflow run of an unfinished earlier attempt at this stage, when its directory
    (and so its checkpoints) is what this run resumes from."""
    from llm_lifecycle.registry import tracking

    if not p.directory.is_dir() or p.result_file.exists():
        return None
    return tracking.unfinished_run(recipe.name, {"llm.stage": p.name, "llm.fingerprint": p.fingerprint})


def _seed_everything(seed: int) -> None:
    """The same random state at every stage start, whatever ran before it in this process,
    so that a stage resumed in a new process computes what an uninterrupted run would."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _all_upstream(stage: str) -> list[str]:
    """Every stage `stage` depends on, directly or not (so stages can reach e.g. the tokenizer)."""
    seen: list[str] = []
    stack = list(STAGES[stage].upstream)
    while stack:
        s = stack.pop()
        if s not in seen:
            seen.append(s)
            stack.extend(STAGES[s].upstream)
    return seen
