"""Held-out accuracy of a recipe's reward models on each preference kind: the single-kind
models, Llama 2's rule over the safety and helpfulness models, one model trained on every
kind, and InternLM2's COOL conditional model (each kind scored under its own system prompt).

Run after `llm pipeline llama2-rlhf`, with the same LLM_HOME:

    python benches/reward_models.py llama2-rlhf [--json rows.json]

The held-out pairs of a kind are the first `heldout_pairs` of its data file, which no reward
model of the recipe trained on (the rl stage holds those out of every file it reads). A
pair counts as right when the model scores the chosen reply above the rejected one (a tie
counts half). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llm_lifecycle.registry import tracking
from llm_lifecycle.workflows.data.chat_data import load_preference_pairs
from llm_lifecycle.workflows.refs import data_path
from llm_lifecycle.workflows.rl.reward_model import load_reward_model, pair_accuracy
from llm_lifecycle.workflows.rl.rewards import RewardModels
from llm_lifecycle.workflows.runner.recipe import load_recipe


def heldout_pairs(instances) -> dict[str, tuple[list, list, list]]:
    """kind -> (prompt dicts, chosen replies, rejected replies): each kind's file's first pairs."""
    by_kind = {}
    for inst in instances:
        cfg = inst.settings
        for uri, kind in zip(cfg.data, cfg.kinds):
            pairs = load_preference_pairs(data_path(uri, f"stages.{inst.name}.data"))[: cfg.heldout_pairs]
            by_kind.setdefault(kind, ([{"messages": p, "kind": kind} for p, _, _ in pairs],
                                      [c for _, c, _ in pairs], [r for _, _, r in pairs]))
    return by_kind


def latest_reward_model(recipe_name: str, instance: str) -> str:
    """The reward model of the instance's latest finished run in the workspace."""
    results = sorted((tracking.workspace() / recipe_name / instance).glob("*/result.json"), key=lambda p: p.stat().st_mtime)
    if not results:
        raise SystemExit(f"{instance}: no finished run in {tracking.workspace()}; run `llm pipeline {recipe_name}` first")
    return json.loads(results[-1].read_text())["result"]["outputs"]["reward_model"]


def scorers(recipe_name: str, instances) -> dict[str, RewardModels]:
    """Row label -> the reward models that score it, as the rl stage would combine them."""
    loaded = {inst.name: load_reward_model(latest_reward_model(recipe_name, inst.name)) for inst in instances}
    rows = {}
    for inst in instances:
        model, tokenizer = loaded[inst.name]
        label = f"`{inst.name}` ({', '.join(inst.settings.kinds)}{'; a system prompt per kind' if inst.settings.kind_prompts else ''})"
        rows[label] = RewardModels(model, tokenizer, system_prompt=inst.upstream.get("system_prompt"),
                                   kind_prompts=dict(inst.settings.kind_prompts))
    if {"rm-helpful", "rm-safety"} <= loaded.keys():
        system = next(i for i in instances if i.name == "rm-safety").upstream.get("system_prompt")
        rows["Llama 2 rule: `rm-safety` on safety prompts or below 0.15, else `rm-helpful`"] = RewardModels(
            *loaded["rm-helpful"], *loaded["rm-safety"], system_prompt=system)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a recipe whose rl instances of method rm have run (llama2-rlhf)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    instances = [i for i in recipe.instances.values() if i.kind == "rl" and i.settings.method == "rm" and i.settings.kinds]
    pairs = heldout_pairs(instances)
    kinds = list(pairs)
    results = []
    for label, models in scorers(recipe.name, instances).items():
        row = {"model": label}
        for kind in kinds:
            prompts, chosen, rejected = pairs[kind]
            row[kind] = float(pair_accuracy(models.score(prompts, chosen), models.score(prompts, rejected)))
        results.append(row)
    print("| reward model | " + " | ".join(f"{k} ({len(pairs[k][0])} pairs)" for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for row in results:
        print(f"| {row['model']} | " + " | ".join(f"{row[k]:.3f}" for k in kinds) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
