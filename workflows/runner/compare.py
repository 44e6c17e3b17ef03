"""Compare pipelines side by side: what was different, how the losses went, how they scored.

`build_report` reads the tracking store (never the workspace files, so it works on a shared
MLflow server too) and writes three files: compare.png (loss curves per training stage and
eval scores), compare.html (the same plot with the tables) and compare.json (the numbers).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from llm_lifecycle.workflows.stages import DEFAULT_CHAIN
from llm_lifecycle.workflows.runner.stage import UserError, atomic_path, write_json_atomic

LOSS_STAGES = ("pretrain", "extend-context", "sft", "rl")
# Stages whose metrics describe data, not the model: shown only where the runs differ.
DATA_STAGES = ("data-fetch", "data-clean", "tokenizer-train", "tokenize")


@dataclass
class Compared:
    run_id: str
    label: str
    params: dict[str, str]  # the pipeline's params plus each stage's, as "stage.key"
    metrics: dict[str, float]  # the pipeline's per-stage summary metrics, "stage.metric"
    stage_run_ids: dict[str, str]


@dataclass
class Report:
    runs: list[Compared]
    differing_params: dict[str, list[str]]  # key -> value per run
    metric_rows: dict[str, list[float | None]]  # key -> value per run
    loss_curves: dict[str, dict[str, tuple[list[int], list[float]]]]  # stage -> label -> (steps, losses)
    files: dict[str, Path] = field(default_factory=dict)


def gather(refs: list[str]) -> list[Compared]:
    """Resolve run ids / recipe names to pipeline runs (see catalog.pipeline_runs)."""
    from llm_lifecycle.registry import catalog

    pipelines = []
    for ref in refs:
        try:
            pipelines.extend(catalog.pipeline_runs(ref))
        except LookupError as err:
            raise UserError(f"llm compare: {err}") from None
    seen, unique = set(), []
    for run in pipelines:
        if run.info.run_id not in seen:
            seen.add(run.info.run_id)
            unique.append(run)
    if len(unique) < 2:
        raise UserError("llm compare: need at least two pipeline runs; give more runs or recipes, or a sweep run id")
    compared = []
    for run in unique:
        stages = catalog.stage_runs(run)
        params = dict(run.data.params)
        for stage, stage_run in stages.items():
            params.update({f"{stage}.{k}": v for k, v in stage_run.data.params.items() if not k.startswith("model.")})
        compared.append(Compared(run.info.run_id, _label(run), params, dict(run.data.metrics),
                                 {s: r.info.run_id for s, r in stages.items()}))
    _disambiguate(compared)
    return compared


def _label(run) -> str:
    tags = run.data.tags
    return tags.get("llm.variant") or tags.get("llm.recipe") or run.info.run_name


def _disambiguate(compared: list[Compared]) -> None:
    labels = [c.label for c in compared]
    for c in compared:
        if labels.count(c.label) > 1:
            c.label = f"{c.label} ({c.run_id[:6]})"


def differing_params(runs: list[Compared]) -> dict[str, list[str]]:
    # Paths and run bookkeeping differ between any two runs and say nothing about the recipe.
    ignored = {"recipe", "overrides", "stages_run"}
    keys = sorted({k for r in runs for k in r.params} - ignored)
    rows = {}
    for key in keys:
        values = [r.params.get(key, "—") for r in runs]
        if len(set(values)) > 1:
            rows[key] = values
    return rows


def metric_rows(runs: list[Compared]) -> dict[str, list[float | None]]:
    def order(key: str) -> tuple[int, str]:
        stage = key.split(".", 1)[0]
        return (DEFAULT_CHAIN.index(stage) if stage in DEFAULT_CHAIN else len(DEFAULT_CHAIN), key)

    rows = {}
    for key in sorted({k for r in runs for k in r.metrics}, key=order):
        values = [r.metrics.get(key) for r in runs]
        if key.split(".", 1)[0] in DATA_STAGES and len(set(values)) == 1:
            continue
        rows[key] = values
    return rows


def loss_curves(runs: list[Compared]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    from llm_lifecycle.registry.catalog import metric_history

    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for stage in LOSS_STAGES:
        for run in runs:
            run_id = run.stage_run_ids.get(stage)
            if run_id is None:
                continue
            steps, values = metric_history(run_id, "loss")
            if steps:
                curves.setdefault(stage, {})[run.label] = (steps, values)
    return curves


def build_report(refs: list[str], out_dir: Path) -> Report:
    runs = gather(refs)
    report = Report(runs, differing_params(runs), metric_rows(runs), loss_curves(runs))
    out_dir.mkdir(parents=True, exist_ok=True)
    report.files = {"png": out_dir / "compare.png", "html": out_dir / "compare.html", "json": out_dir / "compare.json"}
    figure = plot(report)
    with atomic_path(report.files["png"]) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    with atomic_path(report.files["html"]) as tmp:
        tmp.write_text(render_html(report), encoding="utf-8")
    write_json_atomic(report.files["json"], {
        "runs": [{"run_id": r.run_id, "label": r.label} for r in runs],
        "differing_params": report.differing_params,
        "metrics": report.metric_rows,
        "loss_curves": {s: {label: {"step": st, "loss": v} for label, (st, v) in c.items()}
                        for s, c in report.loss_curves.items()},
    })
    return report


def plot(report: Report):
    """One panel per training stage (loss vs step, a line per run) and one of eval scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Accuracy-like scores share one axis; perplexities and standard errors would not fit it.
    scores = {k: v for k, v in report.metric_rows.items()
              if k.startswith("eval.") and "ppl" not in k and "stderr" not in k}
    panels = list(report.loss_curves) + (["eval"] if scores else [])
    columns = min(len(panels), 3) or 1
    rows = -(-len(panels) // columns) or 1
    figure, axes = plt.subplots(rows, columns, figsize=(4.8 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    colors = {r.label: f"C{i}" for i, r in enumerate(report.runs)}
    for ax, panel in zip(axes.flat, panels):
        if panel == "eval":
            _plot_scores(ax, report, scores, colors)
            continue
        for label, (steps, losses) in report.loss_curves[panel].items():
            ax.plot(steps, losses, label=label, color=colors[label], linewidth=1.6)
        ax.set(title=f"{panel} loss", xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _plot_scores(ax, report: Report, scores: dict[str, list[float | None]], colors: dict[str, str]) -> None:
    names = list(scores)
    width = 0.8 / len(report.runs)
    for i, run in enumerate(report.runs):
        values = [scores[n][i] if scores[n][i] is not None else 0.0 for n in names]
        positions = [j + i * width for j in range(len(names))]
        ax.bar(positions, values, width=width, label=run.label, color=colors[run.label])
    ax.set_xticks([j + width * (len(report.runs) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels([n.removeprefix("eval.") for n in names], rotation=30, ha="right", fontsize=7)
    ax.set(title="eval")
    ax.legend(fontsize=7)


def render_html(report: Report) -> str:
    image = base64.b64encode(report.files["png"].read_bytes()).decode()
    head = "".join(f"<th>{html.escape(r.label)}<br><code>{r.run_id[:8]}</code></th>" for r in report.runs)

    def table(title: str, rows: dict[str, list]) -> str:
        body = "".join(
            f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in values) + "</tr>"
            for k, values in rows.items()
        )
        return f"<h2>{title}</h2><table><tr><th></th>{head}</tr>{body}</table>"

    style = "body{font-family:sans-serif;margin:2em} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>llm compare</title><style>{style}</style></head>"
        f"<body><h1>llm compare</h1><img alt='loss curves and eval scores' src='data:image/png;base64,{image}'>"
        + table("What differs", report.differing_params)
        + table("Metrics", report.metric_rows)
        + "</body></html>"
    )


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def log_report(report: Report, experiment: str) -> str:
    """Record the comparison as a run of its own (artifacts + the compared run ids)."""
    from llm_lifecycle.registry import tracking

    tags = {"llm.stage": "compare", "llm.compared": ",".join(r.run_id for r in report.runs)}
    with tracking.start_run(experiment, "compare", tags) as run:
        for path in report.files.values():
            run.log_artifact(path, "report")
    return run.run_id


def compare_runs(refs: list[str], out_dir: Path) -> tuple[Report, str]:
    """`llm compare`: the report, also logged as a "compare" run in the first run's experiment."""
    from mlflow.tracking import MlflowClient

    report = build_report(refs, out_dir)
    client = MlflowClient()
    first = client.get_run(report.runs[0].run_id)
    experiment = client.get_experiment(first.info.experiment_id).name
    return report, log_report(report, experiment)
