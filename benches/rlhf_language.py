"""One row per workspace of `llm pipeline llama2-rlhf`: the reward models' held-out accuracy
(real pairs, and the mismatched ones when the recipe adds them), then for ppo and grpo the
held-out reward before -> after, the judge's win rate, the KL to the reference, and R1's
language consistency on English (safety) and Chinese (helpful) held-out prompts before -> after.
Read from each instance's latest result.json (the metrics its MLflow run logged).

    python benches/rlhf_language.py /tmp/lg11 /tmp/lg12 /tmp/lg13
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def metrics(workspace: Path, instance: str, recipe: str = "llama2-rlhf") -> dict[str, float]:
    results = sorted((workspace / recipe / instance).glob("*/result.json"), key=lambda p: p.stat().st_mtime)
    if not results:
        raise SystemExit(f"{workspace}: no finished {instance}; run `llm pipeline {recipe}` there first")
    return json.loads(results[-1].read_text())["result"]["metrics"]


def row(workspace: Path) -> str:
    cells = [workspace.name]
    for rm in ("rm", "judge"):
        m = metrics(workspace, rm)
        mismatched = m.get("heldout_after.mismatched.rm_accuracy")
        cells.append(f"{m['heldout_after.rm_accuracy']:.3f} ({m['heldout_after.safety.rm_accuracy']:.3f} / "
                     f"{m['heldout_after.helpful.rm_accuracy']:.3f})"
                     + (f"; mismatched {mismatched:.3f}" if mismatched is not None else ""))
    for rl in ("ppo", "grpo"):
        m = metrics(workspace, rl)
        cells += [f"{m['heldout_reward_before']:.3f} -> {m['heldout_reward']:.3f}", f"{m['heldout_win_rate']:.3f}",
                  f"{m['heldout_kl']:.1f}"]
        cells += [f"{m[f'heldout_language_consistency_before.{k}']:.2f} -> {m[f'heldout_language_consistency.{k}']:.2f}"
                  for k in ("safety", "helpful")]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspaces", type=Path, nargs="+", help="LLM_HOME folders, one seed each")
    args = parser.parse_args()
    print("| workspace | `rm` held-out acc. (safety / helpful) | `judge` held-out acc. | `ppo` reward | `ppo` judge win "
          "| `ppo` KL | `ppo` consistency en | `ppo` consistency zh | `grpo` reward | `grpo` judge win | `grpo` KL "
          "| `grpo` consistency en | `grpo` consistency zh |")
    print("|" + "---|" * 13)
    for workspace in args.workspaces:
        print(row(workspace))


if __name__ == "__main__":
    main()
