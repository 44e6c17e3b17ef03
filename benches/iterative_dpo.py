"""Online iterative DPO round by round: the judge's win rate against the SFT model after each
round, with the reward of the replies sampled in it, the best-worst gap and the DPO loss,
and the held-out accuracy of the ranking and judging reward models.

Run after `llm pipeline qwen2-iterative-dpo`, with the same LLM_HOME:

    python benches/iterative_dpo.py qwen2-iterative-dpo [--json rows.json]

Reads the newest finished MLflow run of each rl instance of the recipe: the per-round
figures the iterative-dpo stage logs with step = round (round 0: the SFT model itself).
The held-out prompts are the first `heldout_prompts` of the prompt file, which no reward
model of the recipe trained on (each holds out the file's first `heldout_pairs` pairs).
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from llm_lifecycle.registry import tracking
from llm_lifecycle.workflows.runner.recipe import load_recipe

ROUND_COLUMNS = ("judge_win_rate", "heldout_reward", "sample_reward", "reward_gap", "pairs", "dpo_loss")


def newest_run(client: MlflowClient, experiment: str, instance: str):
    runs = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        filter_string=f"attributes.run_name = '{instance}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"no finished run of {instance!r} in experiment {experiment!r}; run `llm pipeline {experiment}`")
    return runs[0]


def round_rows(client: MlflowClient, run) -> list[dict]:
    rows: dict[int, dict] = {}
    for column in ROUND_COLUMNS:
        for point in client.get_metric_history(run.info.run_id, f"round.{column}"):
            rows.setdefault(point.step, {"round": point.step})[column] = point.value
    return [rows[r] for r in sorted(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a recipe with an rl instance of method iterative-dpo (qwen2-iterative-dpo)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    tracking.configure()
    client = MlflowClient()
    recipe = load_recipe(args.recipe)
    rl = [i for i in recipe.instances.values() if i.kind == "rl"]
    print("| reward model | held-out pairs | accuracy before -> after |\n|---|---|---|")
    for inst in (i for i in rl if i.settings.method == "rm"):
        m = newest_run(client, recipe.name, inst.name).data.metrics
        print(f"| `{inst.name}` (pair_half {inst.settings.pair_half}) | {inst.settings.heldout_pairs} | "
              f"{m['heldout_before.rm_accuracy']:.3f} -> {m['heldout_after.rm_accuracy']:.3f} |")
    results = {}
    for inst in (i for i in rl if i.settings.method == "iterative-dpo"):
        run = newest_run(client, recipe.name, inst.name)
        rows = round_rows(client, run)
        results[inst.name] = rows
        measured = int(run.data.metrics.get("heldout_prompts", 0))  # those of the held-out ones that fit seq_len
        print(f"\n`{inst.name}` ({measured} held-out prompts; round 0 = the SFT model)\n")
        print("| round | " + " | ".join(ROUND_COLUMNS) + " |\n|---|" + "---|" * len(ROUND_COLUMNS))
        for row in rows:
            print(f"| {row['round']} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in ROUND_COLUMNS) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
