"""`llm sweep`: one recipe run for every combination of the varied settings, at equal token
budget, each pipeline nested under one sweep run, ending with the comparison report.

    llm sweep llama-small --vary model.position=rope,alibi --vary model.n_kv_heads=1,4

Only settings that change the model or the method may vary: the steps, batch size, sequence
length and accumulation of the training stages are the token budget, the same for every
variant, so that the comparison is at equal data (and, for equal-size models, equal compute).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from llm_lifecycle.workflows.runner.pipeline import SweepMember, run_pipeline
from llm_lifecycle.workflows.runner.recipe import Recipe, load_recipe
from llm_lifecycle.workflows.runner.stage import Progress, UserError
from llm_lifecycle.workflows.runner.recipe_lock import hold_recipe

BUDGET_KEYS = ("steps", "batch_size", "seq_len", "grad_accum")


@dataclass(frozen=True)
class Variant:
    overrides: tuple[str, ...]  # e.g. ("model.position=alibi", "model.n_kv_heads=1")

    @property
    def label(self) -> str:
        return " ".join(self.overrides)

    @property
    def slug(self) -> str:
        """A registry-safe name part: "model.position=alibi" -> "position-alibi"."""
        parts = [o.split(".", 1)[1] if o.startswith("model.") else o for o in self.overrides]
        return re.sub(r"[^A-Za-z0-9]+", "-", "-".join(parts)).strip("-").lower()


def parse_vary(specs: list[str]) -> list[tuple[str, list[str]]]:
    """["model.position=rope,alibi"] -> [("model.position", ["rope", "alibi"])], checked."""
    parsed: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not choices:
            raise UserError(f"--vary {spec!r}: expected KEY=VALUE1,VALUE2,..., e.g. --vary model.position=rope,alibi")
        if key in (k for k, _ in parsed):
            raise UserError(f"--vary {key} given twice; list all its values in one --vary")
        stage, _, setting = key.partition(".")
        if stage != "model" and setting in BUDGET_KEYS:
            raise UserError(
                f"--vary {key}: this changes the token budget, and a sweep compares variants at equal "
                f"budget; set it for all variants with --set {key}=VALUE, or run separate pipelines"
            )
        parsed.append((key, choices))
    if not parsed:
        raise UserError("llm sweep: give at least one --vary KEY=VALUE1,VALUE2")
    return parsed


def variants(varied: list[tuple[str, list[str]]]) -> list[Variant]:
    """The cartesian product of the varied settings, in the order given."""
    keys = [k for k, _ in varied]
    return [Variant(tuple(f"{k}={v}" for k, v in zip(keys, combo))) for combo in itertools.product(*(vs for _, vs in varied))]


def token_budget(recipe: Recipe) -> dict[str, int]:
    """Training tokens each training stage consumes: steps x batch x accumulation x length."""
    budget = {}
    for stage, inst in recipe.instances.items():
        if inst.spec.trains:
            s = inst.settings
            budget[stage] = s.steps * s.batch_size * s.grad_accum * s.seq_len
    return budget


@dataclass
class SweepResult:
    run_id: str
    pipeline_run_ids: list[str]
    report_dir: Path


def run_sweep(
    recipe_name: str, vary: list[str], overrides: list[str], workspace: Path, progress: Progress, wait: bool = False
) -> SweepResult:
    from llm_lifecycle import __version__
    from llm_lifecycle.registry import tracking
    from llm_lifecycle.workflows.runner.compare import build_report

    varied = parse_vary(vary)
    planned = variants(varied)
    # Resolve every variant before any training: a bad combination fails in seconds, not hours.
    recipes = [load_recipe(recipe_name, [*overrides, *v.overrides]) for v in planned]
    base = recipes[0]
    tracking.configure(workspace)
    tags = {"llm.recipe": base.name, "llm.stage": "sweep", "llm.version": __version__}
    label = " x ".join(f"{k}={','.join(vs)}" for k, vs in varied)
    # The sweep holds its recipe from before its run opens until its last variant is done.
    with (hold_recipe(workspace, base.name, wait, progress),
          tracking.start_run(base.name, f"sweep [{label}]", tags) as sweep_run):
        sweep_run.log_params({"vary": vary, "overrides": overrides, "variants": len(planned)})
        sweep_run.log_params({"tokens": token_budget(base)})
        for variant, recipe in zip(planned, recipes):
            progress.log(f"[bold magenta]variant {variant.label}[/bold magenta]")
            member = SweepMember(sweep_run.run_id, variant.label, f"{recipe.name}-{variant.slug}")
            run_pipeline(recipe, workspace, progress, sweep=member)
        report_dir = workspace / "reports" / f"sweep-{sweep_run.run_id[:8]}"
        report = build_report([sweep_run.run_id], report_dir)  # a sweep run resolves to its pipelines
        pipeline_ids = [r.run_id for r in report.runs]
        sweep_run.log_artifact(report_dir, "report")
    return SweepResult(sweep_run.run_id, pipeline_ids, report_dir)

