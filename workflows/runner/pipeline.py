"""The pipeline runner: plans a recipe's stage graph, reuses completed stages, runs the rest
as MLflow runs nested under one pipeline run.

Each instance's fingerprint hashes (its kind, its settings, the model config when it makes
or takes a model, the seed, the fingerprints of the instances on its inputs, the package
version): edit one stage and exactly it and what depends on it run again. An instance whose
`result.json` exists for that fingerprint is reused; a stage directory without one is a
stage that died half-way, and the stage resumes from its own checkpoints there; its new
MLflow run links to the run that died (`llm.resumes_run`), as the new pipeline run links
to the pipeline run that died.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from llm_lifecycle import __version__
from llm_lifecycle.workflows.engine.ranks import is_main_process
from llm_lifecycle.workflows.engine.distributed import barrier
from llm_lifecycle.workflows.refs import data_state
from llm_lifecycle.workflows.runner.library_output import library_output_to
from llm_lifecycle.workflows.runner.graph import Instance, dependents
from llm_lifecycle.workflows.runner.planning import refuse_what_cannot_fit
from llm_lifecycle.workflows.runner.recipe import Recipe
from llm_lifecycle.workflows.runner.recipe_lock import hold_recipe
from llm_lifecycle.workflows.runner.settings import as_dict
from llm_lifecycle.workflows.runner.stage import (
    Progress,
    StageContext,
    StageResult,
    UserError,
    write_json_atomic,
)
from llm_lifecycle.workflows.runner.summary import log_headline


@dataclass
class PlannedStage:
    name: str
    kind: str
    fingerprint: str
    directory: Path
    selected: bool  # asked for in this invocation
    cached: bool  # a completed result exists for this fingerprint
    sources: dict[str, str]  # port -> instance it takes that input from

    @property
    def result_file(self) -> Path:
        return self.directory / "result.json"

    @property
    def will_run(self) -> bool:
        return self.selected and not self.cached


def _uses_model(inst: Instance) -> bool:
    spec = inst.spec
    return spec.output == "model" or any(p.accepts == "model" for p in spec.inputs)


def _strings(value) -> list[str]:
    """Every string inside a settings value (lists and mappings walked)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def fingerprints(recipe: Recipe) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, inst in recipe.instances.items():
        settings = as_dict(inst.settings)
        payload = {
            "kind": inst.kind,
            "config": settings,
            "model": inst.values["model"] if _uses_model(inst) and not settings.get("init") else None,
            "seed": recipe.seed,
            "upstream": {port: out[source] for port, source in sorted(inst.sources.items())},
            "version": __version__,
            "data": {text: state for text in _strings(settings) if (state := data_state(text))},
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        out[name] = hashlib.sha256(blob).hexdigest()[:16]
    return out


def _parse_stage_list(recipe: Recipe, text: str | None, option: str) -> list[str] | None:
    if not text:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    for n in names:
        if n not in recipe.instances:
            raise UserError(f"{option}: recipe {recipe.name} has no stage '{n}'; its stages are "
                            f"{', '.join(recipe.instances)}")
    return names


def plan(
    recipe: Recipe,
    workspace: Path,
    stages: str | list[str] | None = None,
    from_stage: str | None = None,
    force: tuple[str, ...] = (),
) -> list[PlannedStage]:
    order = list(recipe.instances)
    chosen = _parse_stage_list(recipe, stages if isinstance(stages, str) or stages is None else ",".join(stages),
                               "--stages")
    forced = _parse_stage_list(recipe, ",".join(force), "--force") or []
    if from_stage is not None:
        _parse_stage_list(recipe, from_stage, "--from")
        start = order.index(from_stage)
        chosen = [s for s in (chosen or order) if order.index(s) >= start]
    chosen = chosen or order
    # Forcing a stage re-runs everything that takes its outputs, as make would.
    forced_all = dependents(recipe.instances, set(forced))
    fps = fingerprints(recipe)
    planned = []
    for name, inst in recipe.instances.items():
        directory = workspace / recipe.name / name / fps[name]
        done = (directory / "result.json").is_file() and name not in forced_all
        planned.append(PlannedStage(name, inst.kind, fps[name], directory, name in chosen, done, dict(inst.sources)))
    _check_upstream(recipe, planned)
    return planned


def _check_upstream(recipe: Recipe, planned: list[PlannedStage]) -> None:
    by_name = {p.name: p for p in planned}
    for p in planned:
        if not p.will_run:
            continue
        for up in p.sources.values():
            u = by_name[up]
            if not (u.cached or u.selected):
                raise UserError(
                    f"stage '{p.name}' needs stage '{up}', which has not completed for this "
                    f"configuration; include it: --stages {up},{p.name} (or run the whole pipeline)"
                )


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
    wait: bool = False,
) -> dict[str, StageResult]:
    """Run the planned stages under one parent MLflow run; returns every stage's result.
    Another process running the recipe is waited for (`wait`) or refused."""
    from llm_lifecycle.registry import tracking

    planned = plan(recipe, workspace, stages, from_stage, force)
    refuse_what_cannot_fit(recipe, [p.name for p in planned if p.will_run])
    tracking.configure(workspace)  # a workspace we cannot write, a server that does not answer: one line
    with hold_recipe(workspace, recipe.name, wait, progress):
        _check_ready_inputs(recipe, planned)
        return _run_planned(recipe, workspace, progress, planned, sweep)


def _inputs_ready(p: PlannedStage, by_name: dict[str, PlannedStage]) -> bool:
    """Whether every instance `p` takes inputs from has completed before this invocation."""
    return all(by_name[source].cached for source in p.sources.values())


def _check_inputs(recipe: Recipe, name: str, inputs: dict[str, StageResult]) -> None:
    recipe.instances[name].settings.check_inputs(f"stages.{name}", inputs)


def _check_ready_inputs(recipe: Recipe, planned: list[PlannedStage]) -> None:
    """Each stage to run whose inputs exist already checks them now, before the pipeline's
    MLflow run opens (the others check theirs just before their own run)."""
    by_name = {p.name: p for p in planned}
    for p in planned:
        if p.will_run and _inputs_ready(p, by_name):
            _check_inputs(recipe, p.name, {port: _cached_result(by_name[source])
                                           for port, source in p.sources.items()})


def _cached_result(p: PlannedStage) -> StageResult:
    return StageResult.from_json(json.loads(p.result_file.read_text())["result"])


def _run_planned(recipe: Recipe, workspace: Path, progress: Progress, planned: list[PlannedStage],
                 sweep: SweepMember | None) -> dict[str, StageResult]:
    from llm_lifecycle.registry import tracking

    results: dict[str, StageResult] = {}
    by_name = {p.name: p for p in planned}
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
            if not p.cached and p.selected and not is_main_process() and not recipe.instances[p.name].spec.trains:
                barrier()  # under torchrun rank 0 alone runs the data and evaluation stages
                results[p.name] = _cached_result(p)
                continue
            if p.cached:
                results[p.name] = _cached_result(p)
                if p.selected:
                    progress.log(f"[dim]{p.name}: reused ({p.fingerprint})[/dim]")
                continue
            if not p.selected:
                continue
            if not _inputs_ready(p, by_name):  # made in this invocation: checked now, before its run opens
                _check_inputs(recipe, p.name, {port: results[source] for port, source in p.sources.items()})
            with _stage_lock(recipe, p), library_output_to(p.directory, progress):
                results[p.name] = _run_stage(recipe, workspace, p, results, progress, parent, base_tags,
                                             registered_name)
            barrier()  # the next stage on any rank reads what this one wrote
        for name, result in results.items():
            parent.log_metrics({f"{name}.{k}": v for k, v in result.metrics.items()})
        log_headline(parent, results, {name: instance.kind for name, instance in recipe.instances.items()})
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

    inst = recipe.instances[p.name]
    tags = {**base_tags, "llm.stage": p.name, "llm.kind": inst.kind, "llm.fingerprint": p.fingerprint,
            "llm.parent_stage": ",".join(dict.fromkeys(inst.sources.values()))}
    if is_main_process():
        previous = _previous_attempt(recipe, p)
        if previous:
            tags["llm.resumes_run"] = previous.run_id
        if p.result_file.exists():
            shutil.rmtree(p.directory)  # --force: start the stage afresh, not from old checkpoints
        p.directory.mkdir(parents=True, exist_ok=True)
    if inst.spec.trains:
        barrier()  # every rank trains; none starts before rank 0 has made the stage directory
    progress.log(f"[bold]{p.name}[/bold] ({inst.kind}, {p.fingerprint})" if inst.kind != p.name
                 else f"[bold]{p.name}[/bold] ({p.fingerprint})")
    with tracking.start_run(recipe.name, p.name, tags, parent_run_id=parent.run_id) as tracker:
        _seed_everything(recipe.seed)
        params = as_dict(inst.settings)
        if _uses_model(inst):  # the resolved model config (pretrain's own `model` setting is part of it)
            params["model"] = inst.values["model"]
        tracker.log_params(params)
        ctx = StageContext(
            stage=p.name,
            kind=inst.kind,
            recipe=recipe,
            workspace=workspace,
            stage_dir=p.directory,
            inputs={port: results[source] for port, source in inst.sources.items()},
            sources=dict(inst.sources),
            values=inst.upstream,
            tracker=tracker,
            progress=progress,
            seed=recipe.seed,
        )
        result = inst.spec.run(ctx, inst.settings)
        if not is_main_process():
            return result
        tracker.log_metrics(result.metrics)
        if result.model_dir:
            lineage = {**base_tags, "llm.stage": p.name, "llm.kind": inst.kind, "llm.fingerprint": p.fingerprint,
                       "llm.source_run": tracker.run_id, "llm.parent_stage": tags["llm.parent_stage"]}
            aliases = list(dict.fromkeys([result.model_alias or p.name, *result.aliases]))
            version = tracking.log_and_register_model(tracker, result.model_dir, registered_name, aliases, lineage)
            result.model_version = [registered_name, str(version)]
            progress.log(f"  registered models:/{registered_name}@{'|'.join(aliases)} (version {version})")
    write_json_atomic(p.result_file, {"result": result.to_json(), "run_id": tracker.run_id,
                                      "fingerprint": p.fingerprint})
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
