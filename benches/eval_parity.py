"""Our lm-eval adapter against lm-eval's own `hf` backend, on the same exported checkpoint.

A tiny llama-small is trained with the pipeline's own stages (data-fetch .. pretrain), exported
to a Hugging Face folder with models/hf.py, and scored on mmlu, ceval-valid and gsm8k by both
`LifecycleLM` (our model in torch) and `HFLM` (transformers' LlamaForCausalLM on the folder),
in the same process, with the same lm-eval task definitions, data, batch size and seed.
The benchmark splits we may not ship are stood in for by the official files in DATA
(--data DATA, ../shared/data by default), laid out as the official folders: MMLU val as
`test`, C-Eval dev as `val` (and dev), GSM8K train split into test (last rows) and train (few-shot pool).

    flock /work/wt/bench.lock nice python benches/eval_parity.py --limit 100

Prints a markdown table (scores, per-document agreement, wall time of each backend, ratio).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # the default --data: beside the clone
# The score each suite is judged by, per lm-eval task name in the flattened metrics.
HEADLINE = {
    "mmlu": ["eval.mmlu.acc"],
    "ceval": ["eval.ceval-valid.acc"],
    "gsm8k": ["eval.gsm8k.exact_match_strict-match", "eval.gsm8k.exact_match_flexible-extract"],
}
TINY_MODEL = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
    "model.ffn_dim=176", "model.max_seq_len=512", "tokenizer-train.vocab_size=2048",
    "pretrain.steps=80", "pretrain.batch_size=8", "pretrain.seq_len=128", "pretrain.warmup_steps=8",
    "pretrain.checkpoint_every=1000", "pretrain.log_every=20",
]


def official_layout(out: Path, shared: Path, gsm8k_test: int = 200, gsm8k_train: int = 400) -> Path:
    """A data folder in the official layouts, built from the --data folder `shared` (see the module docstring)."""
    shutil.copytree(shared / "mmlu" / "dev", out / "mmlu" / "dev")
    (out / "mmlu" / "test").mkdir(parents=True)
    for f in (shared / "mmlu" / "val").iterdir():
        shutil.copy(f, out / "mmlu" / "test" / f.name.replace("_val.csv", "_test.csv"))
    shutil.copytree(shared / "ceval" / "dev", out / "ceval" / "dev")
    (out / "ceval" / "val").mkdir()
    for f in (shared / "ceval" / "dev").iterdir():
        shutil.copy(f, out / "ceval" / "val" / f.name.replace("_dev.csv", "_val.csv"))
    lines = (shared / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (out / "gsm8k").mkdir()
    (out / "gsm8k" / "train.jsonl").write_text("\n".join(lines[:gsm8k_train]) + "\n", encoding="utf-8")
    (out / "gsm8k" / "test.jsonl").write_text("\n".join(lines[-gsm8k_test:]) + "\n", encoding="utf-8")
    return out


def train_tiny(workspace: Path) -> Path:
    """Pretrain a tiny llama-small with the pipeline's stages; returns its model folder."""
    from llm_lifecycle.workflows.runner.pipeline import run_pipeline
    from llm_lifecycle.workflows.runner.recipe import load_recipe
    from llm_lifecycle.workflows.runner.stage import SilentProgress

    os.environ["LLM_HOME"] = str(workspace)
    recipe = load_recipe("llama-small", TINY_MODEL)
    results = run_pipeline(recipe, workspace, SilentProgress(), stages="data-fetch,data-clean,tokenizer-train,"
                           "tokenize,pretrain")
    return Path(results["pretrain"].model_dir)


def _per_doc(report) -> dict:
    """(task, doc id, filter) -> the prediction: the chosen option (multiple choice) or the answer text."""
    out = {}
    for task, samples in report.results["samples"].items():
        for s in samples:
            resps = s["filtered_resps"]
            if resps and isinstance(resps[0], (list, tuple)):  # loglikelihood: [(logprob, greedy), ...]
                pred = max(range(len(resps)), key=lambda k: float(resps[k][0]))
                logprobs = [float(r[0]) for r in resps]
            else:
                pred, logprobs = resps[0] if isinstance(resps, list) else resps, None
            out[(task, s["doc_id"], s.get("filter", "none"))] = (pred, logprobs)
    return out


def compare(model_dir: Path, hf_dir: Path, suite: str, data_dir: Path, limit: int, batch_size: int,
            num_fewshot: int | None = None) -> dict:
    """Both backends on one suite; timings are the whole `evaluate_suite` call of each."""
    import lm_eval.tasks  # noqa: F401  (imported before the clocks start: its first import takes seconds)
    from lm_eval.models.huggingface import HFLM

    from llm_lifecycle.evals.harness import LifecycleLM, evaluate_suite
    from llm_lifecycle.models.load import load_model

    backends = {  # each timed from loading its model to the scores
        "ours": lambda: LifecycleLM(*load_model(model_dir), batch_size=batch_size),
        "hf": lambda: HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=batch_size),
    }
    row = {"suite": suite}
    preds = {}
    for name, make in backends.items():
        start, cpu_start = time.perf_counter(), time.process_time()
        lm = make()
        report = evaluate_suite(lm, suite, data_dir=data_dir, limit=limit, num_fewshot=num_fewshot, seed=0,
                                log_samples=True)
        row[f"{name}_s"] = time.perf_counter() - start
        row[f"{name}_cpu_s"] = time.process_time() - cpu_start
        row[name] = {m: report.metrics[m] for m in HEADLINE[suite]}
        row["docs"] = report.num_samples
        preds[name] = _per_doc(report)
    same = [preds["ours"][k][0] == preds["hf"][k][0] for k in preds["ours"]]
    row["agreement"] = sum(same) / len(same)
    gaps = [abs(a - b) for k, (_, lp) in preds["ours"].items() if lp for a, b in zip(lp, preds["hf"][k][1])]
    row["max_logprob_gap"] = max(gaps) if gaps else None
    row["speedup"] = row["hf_s"] / row["ours_s"]
    row["cpu_speedup"] = row["hf_cpu_s"] / row["ours_cpu_s"]
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| suite | docs | metric | ours | hf | Δ points | same prediction | max Δ log-prob | ours s | hf s | hf/ours | hf/ours CPU time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for metric in r["ours"]:
            gap = "" if r["max_logprob_gap"] is None else f"{r['max_logprob_gap']:.1e}"
            lines.append(
                f"| {r['suite']} | {r['docs']} | {metric.split('.', 2)[2]} | {100 * r['ours'][metric]:.2f} | "
                f"{100 * r['hf'][metric]:.2f} | {100 * abs(r['ours'][metric] - r['hf'][metric]):.2f} | "
                f"{100 * r['agreement']:.1f} % | {gap} | {r['ours_s']:.1f} | {r['hf_s']:.1f} | {r['speedup']:.2f}x | "
                f"{r['cpu_speedup']:.2f}x |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=100, help="documents per task (per subject for mmlu/ceval)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--suites", default="mmlu,ceval,gsm8k")
    parser.add_argument("--data", type=Path, default=SHARED_DATA,
                        help="the benchmark data folder: mmlu/, ceval/, gsm8k/ as in ../shared/data (not in the repository)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the trained model here (default: temp)")
    args = parser.parse_args()

    import torch

    from llm_lifecycle.models.hf import export_hf

    with tempfile.TemporaryDirectory(prefix="eval-parity-") as tmp:
        work = args.workdir or Path(tmp)
        model_dir = train_tiny(work / "llm-runs")
        hf_dir = export_hf(model_dir, work / "hf")
        data_dir = official_layout(work / "data", args.data) if not (work / "data").exists() else work / "data"
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {model_dir}", file=sys.stderr)
        rows = [compare(model_dir, hf_dir, s, data_dir, args.limit, args.batch_size) for s in args.suites.split(",")]
    total_ours, total_hf = sum(r["ours_s"] for r in rows), sum(r["hf_s"] for r in rows)
    cpu_ours, cpu_hf = sum(r["ours_cpu_s"] for r in rows), sum(r["hf_cpu_s"] for r in rows)
    print(markdown(rows))
    print(f"\nall suites: wall ours {total_ours:.1f} s, hf {total_hf:.1f} s, hf/ours {total_hf / total_ours:.2f}x; "
          f"CPU time ours {cpu_ours:.1f} s, hf {cpu_hf:.1f} s, hf/ours {cpu_hf / cpu_ours:.2f}x")
    worst = max(100 * abs(r["ours"][m] - r["hf"][m]) for r in rows for m in r["ours"])
    return 0 if worst <= 0.5 and total_hf >= total_ours else 1


if __name__ == "__main__":
    sys.exit(main())
