"""Every shipped recipe is a graph that plans (default suite) and runs to the end (`-m slow`)
on the builtin data, each stage shrunk to a few steps: the recipes of docs/recipes.md are
things a user can run, not only text (issue 18, item 5)."""

from __future__ import annotations

import dataclasses

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from llm_lifecycle.cli.app import app
from llm_lifecycle.workflows import stages
from llm_lifecycle.workflows.runner.recipe import list_recipes, load_recipe

# The settings that make a stage long. Counts (steps, prompts, examples) are cut to an eighth,
# or a third in a recipe that distils: its teacher must still solve some problems (a distill
# stage refuses an empty set of checked answers); the rest take the fixed small values.
# Only those a kind has are set; rl's group_size is its samples per prompt (quantize's is not).
EIGHTH = {"steps": 2, "n_prompts": 16, "rs_prompts": 16, "max_examples": 32, "max_pairs": 16}
FIXED = {"warmup_steps": 0, "checkpoint_every": 1000, "heldout_chats": 4, "heldout_pairs": 4,
         "eval_n": 8, "limit": 2, "max_gen_toks": 8, "passkey_trials": 1, "calib_windows": 2,
         "eval_windows": 2, "rounds": 1}
FIXED_FOR_KIND = {"rl": {"group_size": 2}}


def shrinking_overrides(recipe_name: str) -> list[str]:
    recipe = load_recipe(recipe_name, [])
    divisor = 3 if any(i.kind == "distill" for i in recipe.instances.values()) else 8
    overrides = []
    for name, instance in recipe.instances.items():
        settings = recipe.settings(name)
        fields = {f.name for f in dataclasses.fields(settings)}
        values = {key: max(least, getattr(settings, key) // divisor) for key, least in EIGHTH.items() if key in fields}
        values |= {k: v for k, v in {**FIXED, **FIXED_FOR_KIND.get(instance.kind, {})}.items() if k in fields}
        overrides += [arg for key, value in values.items() for arg in ("--set", f"{name}.{key}={value}")]
    return overrides


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_shipped_recipe_plans(recipe, workspace):
    result = CliRunner().invoke(app, ["pipeline", recipe, "--dry-run", *shrinking_overrides(recipe)],
                                terminal_width=200)
    assert result.exit_code == 0, (result.output, result.exception)
    for name in load_recipe(recipe, []).instances:
        assert name in result.output


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list_recipes())
def test_every_shipped_recipe_runs_to_the_end(recipe, workspace):
    result = CliRunner().invoke(app, ["pipeline", recipe, *shrinking_overrides(recipe)])
    assert result.exit_code == 0, (result.output, result.exception)
    instances = load_recipe(recipe, []).instances
    client = MlflowClient()
    runs = client.search_runs([mlflow.get_experiment_by_name(recipe).experiment_id])
    stage_runs = {r.info.run_name: r for r in runs if r.data.tags.get("llm.stage", "pipeline") != "pipeline"}
    assert set(stage_runs) == set(instances)
    assert all(r.info.status == "FINISHED" for r in runs)
    made_models = {n for n, i in instances.items() if stages.kind(i.kind).output == "model"}
    assert made_models <= set(client.get_registered_model(recipe).aliases)
