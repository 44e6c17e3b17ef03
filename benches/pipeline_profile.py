"""Where a pipeline's wall time goes: per stage, and within each stage the share spent
training, generating, evaluating, logging to MLflow, saving models and starting up.

    pip install py-spy
    python benches/pipeline_profile.py [--recipe qwen3-moe-small] [--rate 50] [--out profile.json]
    python benches/pipeline_profile.py --summarize profile.json     # an earlier recording

Runs `llm pipeline RECIPE` in a fresh workspace under py-spy, a sampling profiler, so the
pipeline runs unmodified; idle time is sampled too, so the shares are of wall time. Only the
main thread counts (MLflow's background threads and tokenizer workers run beside it). Each
sample goes to the stage that was running (the newest stage function entered; before the
first one it is start-up) and to the first category below whose code is on its stack.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

# (category, does this frame belong to it?), in priority order: an import during training
# is start-up, an MLflow call inside the training loop is logging.
CATEGORIES = (
    ("start-up (imports)", lambda name, file: file.startswith("<frozen importlib")),
    ("MLflow logging", lambda name, file: "/mlflow/" in file or file.endswith("registry/tracking.py")),
    ("generation", lambda name, file: file.endswith("models/generate.py")),
    ("evaluation", lambda name, file: "/lm_eval/" in file or "/evals/" in file),
    ("saving models", lambda name, file: name in ("save_checkpoint", "save_stage_model")),
    ("training", lambda name, file: name == "train" and file.endswith("trainer.py")),
)
OTHER = "other (the stage's own work)"
START, BETWEEN = "(start-up, before the first stage)", "(pipeline, between stages)"


def kind_of_module() -> dict[str, str]:
    """Module file stem -> the stage kind it implements (workflows/stages/)."""
    from llm_lifecycle.workflows.stages import MODULES

    return {module: kind for kind, module in MODULES.items()}


def summarize(speedscope: dict) -> tuple[dict[str, dict[str, float]], float]:
    """({stage: {category: seconds}} in the order the stages ran, seconds in all). A stage is
    named by its kind; a later instance of a kind already seen gets a number ("pretrain #2")."""
    frames = speedscope["shared"]["frames"]
    main = max(speedscope["profiles"], key=lambda p: sum(p["weights"]))  # alive the whole run
    kinds = kind_of_module()
    stages: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    current, left = None, False  # the stage running; whether the runner left it since
    for sample, seconds in zip(main["samples"], main["weights"]):
        stack = [frames[i] for i in sample]  # root first
        runner = next((i for i, f in enumerate(stack) if f["name"] == "_run_stage"), None)
        between = runner is None and any(f["name"] == "run_pipeline" for f in stack)  # not a truncated stack
        if between:
            left = current is not None
        elif runner is not None and runner + 1 < len(stack):  # inside a stage: in a kind's run()?
            entry = stack[runner + 1]
            kind = kinds.get(os.path.splitext(os.path.basename(entry["file"] or ""))[0])
            same_kind = current == kind or (current or "").startswith(f"{kind} #")  # tokenize is not tokenizer-train
            if kind and entry["name"] == "run" and (left or not same_kind):
                seen = sum(1 for s in stages if s == kind or s.startswith(f"{kind} #"))
                current, left = kind if not seen else f"{kind} #{seen + 1}", False
        stage = START if current is None else BETWEEN if between else current
        category = next((c for c, belongs in CATEGORIES if any(belongs(f["name"], f["file"] or "") for f in stack)), OTHER)
        stages[stage][category] += seconds
    return stages, sum(main["weights"])


def print_table(stages: dict[str, dict[str, float]], total: float, wall: float | None) -> None:
    scale = wall / total if wall else 1.0  # py-spy drops samples when it falls behind: rescale to the clock
    columns = [c for c, _ in CATEGORIES] + [OTHER]
    print("| stage | wall s | share | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 3) + "|")
    for stage, cats in stages.items():
        seconds = sum(cats.values())
        shares = " | ".join(f"{cats[c] / seconds:.0%}" if cats.get(c) else "-" for c in columns)
        print(f"| {stage} | {seconds * scale:.1f} | {seconds / total:.0%} | {shares} |")
    overall = {c: sum(cats.get(c, 0.0) for cats in stages.values()) for c in columns}
    print("| **all** | " + f"{total * scale:.1f} | 100% | " + " | ".join(f"{overall[c] / total:.0%}" for c in columns) + " |")


def record(recipe: str, rate: int, out: str, extra: list[str]) -> float:
    """Run the pipeline in a fresh workspace with py-spy attached; its wall seconds."""
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is not installed: pip install py-spy")
    home = tempfile.mkdtemp(prefix="pipeline-profile-")
    env = {**os.environ, "LLM_HOME": home, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    # Attached by pid rather than launched by py-spy, which does not pass on the pipeline's exit code.
    pipeline = subprocess.Popen([sys.executable, "-m", "llm_lifecycle.cli.app", "pipeline", recipe, *extra],
                                env=env, stdout=subprocess.DEVNULL)
    spy = subprocess.Popen(["py-spy", "record", "--idle", "--threads", "--rate", str(rate), "--format", "speedscope",
                            "-o", out, "--pid", str(pipeline.pid)], stdout=subprocess.DEVNULL)
    code = pipeline.wait()
    wall = time.perf_counter() - t0
    spy.wait()
    shutil.rmtree(home, ignore_errors=True)
    if code:
        sys.exit(f"llm pipeline {recipe} failed (exit code {code}); its profile is in {out}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="qwen3-moe-small")
    parser.add_argument("--rate", type=int, default=50, help="samples per second")
    parser.add_argument("--out", default="pipeline-profile.json", help="where the py-spy recording goes")
    parser.add_argument("--summarize", metavar="FILE", help="summarize an earlier recording instead")
    parser.add_argument("--set", action="append", default=[], help="passed to llm pipeline --set")
    args = parser.parse_args()
    wall = None
    if not args.summarize:
        wall = record(args.recipe, args.rate, args.out, [a for s in args.set for a in ("--set", s)])
        print(f"llm pipeline {args.recipe}: {wall:.1f} s wall")
    with open(args.summarize or args.out) as f:
        stages, total = summarize(json.load(f))
    print_table(stages, total, wall)


if __name__ == "__main__":
    main()
