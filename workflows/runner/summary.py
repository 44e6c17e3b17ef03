"""A pipeline's headline: each stage's own held-out metric before -> after, one score per eval
suite, what quantization cost, how fast training ran.

`headline_metrics` names them `_headline/<stage>.<metric>` (and `..._before` for the value the
stage started from): MLflow's chart view groups charts
by the part before the `/`, and its runs table and compare view sort metrics by name, where
the `_` puts these before every stage's own (`data-clean.*` ...), so two pipeline runs compare
at a glance. `summary_lines` is what `llm pipeline` prints at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_lifecycle.workflows.runner.stage import StageResult

PREFIX = "_headline/"
# A quantized model whose held-out perplexity rose less than this kept what it knew.
QUANT_PPL_TOLERANCE_PCT = 5.0


@dataclass(frozen=True)
class Moved:
    """A stage's held-out metric measured before and after the stage."""

    metric: str  # its headline name
    label: str  # what the summary calls it
    before: float | None
    after: float
    lower_is_better: bool

    @property
    def improved(self) -> bool | None:
        if self.before is None:
            return None
        return self.after < self.before if self.lower_is_better else self.after > self.before


def _moved(metrics: dict, metric: str, label: str, before: str, after: str, lower_is_better: bool) -> list[Moved]:
    if after not in metrics:
        return []
    return [Moved(metric, label, metrics.get(before), metrics[after], lower_is_better)]


def stage_moves(kind: str, metrics: dict[str, float]) -> list[Moved]:
    """The held-out metrics a stage of `kind` is meant to move, from its result's metrics."""
    m = metrics
    if kind == "pretrain":
        return _moved(m, "heldout_ppl", "held-out ppl", "heldout_ppl_before", "heldout_ppl", True)
    if kind == "extend-context" and "seq_len" in m:
        n = int(m["seq_len"])
        return _moved(m, "long_ppl", f"held-out ppl at {n}", f"ppl_before_{n}", f"ppl_after_{n}", True)
    if kind in ("sft", "rl"):
        return [
            *_moved(m, "heldout_loss", "held-out loss (assistant tokens)", "heldout_loss_before", "heldout_loss", True),
            *_moved(m, "pref_accuracy", "held-out preference accuracy", "heldout_before.reward_accuracy",
                    "heldout_after.reward_accuracy", False),
            *_moved(m, "reward_margin", "held-out reward margin", "heldout_before.reward_margin",
                    "heldout_after.reward_margin", False),
            *_moved(m, "dpo_loss", "held-out DPO loss", "heldout_before.dpo_loss", "heldout_after.dpo_loss", True),
            *_moved(m, "rm_accuracy", "held-out reward-model accuracy", "heldout_before.rm_accuracy",
                    "heldout_after.rm_accuracy", False),
            *_moved(m, "answer_accuracy", "held-out answer accuracy", "heldout_accuracy_before",
                    "heldout_accuracy", False),
        ]
    return []


def suite_lines(metrics: dict[str, float]) -> list[tuple[str, str]]:
    """(suite, its aggregate scores ± stderr) for each lm-eval suite scored: what lm-eval
    reports for the whole suite, never a subject's (those stay in the eval run's artifacts)."""
    from llm_lifecycle.evals.harness import SUITE_SCORES

    lines = []
    for suite, scores in SUITE_SCORES.items():
        shown = [f"{s.label} {metrics[s.key]:.4f}" + (f" ± {metrics[s.stderr_key]:.4f}" if s.stderr_key in metrics else "")
                 for s in scores if s.key in metrics]
        if shown:
            lines.append((suite, ", ".join(shown)))
    return lines


def headline_metrics(results: dict[str, StageResult], kinds: dict[str, str] | None = None) -> dict[str, float]:
    """`_headline/...` metrics for the pipeline run. `kinds` maps a stage instance to its kind
    where the two differ (an instance is named after its kind by default)."""
    from llm_lifecycle.evals.harness import SUITE_SCORES

    headline: dict[str, float] = {}
    for name, result in results.items():
        kind, m = (kinds or {}).get(name, name), result.metrics
        for moved in stage_moves(kind, m):
            headline[f"{PREFIX}{name}.{moved.metric}"] = moved.after
            if moved.before is not None:  # sorts beside the after: the stage's move in two columns
                headline[f"{PREFIX}{name}.{moved.metric}_before"] = moved.before
        if kind == "pretrain" and "tokens_per_s" in m:
            headline[f"{PREFIX}{name}.tokens_per_s"] = m["tokens_per_s"]
        if kind == "quantize" and "ppl_change_pct" in m:
            headline[f"{PREFIX}{name}.ppl_change_pct"] = m["ppl_change_pct"]
            headline[f"{PREFIX}{name}.size_mb"] = m["size_mb_after"]
        if kind == "eval":
            for suite, (score, *_) in SUITE_SCORES.items():
                if score.key in m:
                    headline[f"{PREFIX}{name}.{suite}.{score.metric}"] = m[score.key]
    return headline


def headline_notes(results: dict[str, StageResult]) -> dict[str, str]:
    """The stages' notes (`ceval: not run (no data); ...`) as tags of the pipeline run."""
    return {f"llm.note.{name}.{key}": text for name, result in results.items() for key, text in result.notes.items()}


def log_headline(run, results: dict[str, StageResult], kinds: dict[str, str] | None = None) -> None:
    """Put the headline metrics and the stages' notes on the pipeline run."""
    run.log_metrics(headline_metrics(results, kinds))
    notes = headline_notes(results)
    if notes:
        run.set_tags(notes)


def _arrow(moved: Moved) -> str:
    verdict = {True: "better", False: "WORSE", None: ""}[moved.improved]
    before = "?" if moved.before is None else f"{moved.before:.4g}"
    return f"{moved.label} {before} -> {moved.after:.4g}" + (f" ({verdict})" if verdict else "")


def summary_lines(results: dict[str, StageResult], kinds: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(stage, what it did) lines for the terminal: held-out metrics moved, suite scores, notes."""
    lines = []
    for name, result in results.items():
        kind, m = (kinds or {}).get(name, name), result.metrics
        shown = [_arrow(moved) for moved in stage_moves(kind, m)]
        if kind == "pretrain" and "tokens_per_s" in m:
            shown.append(f"{m['tokens_per_s']:,.0f} tokens/s")
        if kind == "quantize" and "ppl_change_pct" in m:
            small = "small" if m["ppl_change_pct"] < QUANT_PPL_TOLERANCE_PCT else "LARGE"
            shown.append(f"held-out ppl {m['ppl_before']:.4g} -> {m['ppl_after']:.4g} "
                         f"({m['ppl_change_pct']:+.2f}%, {small}); size {m['size_mb_before']:.1f} -> "
                         f"{m['size_mb_after']:.1f} MB")
        if kind == "eval":
            lines += [(f"{name}: {suite}", text) for suite, text in suite_lines(m)]
            if "eval.heldout.ppl" in m:
                shown.append(f"held-out ppl {m['eval.heldout.ppl']:.4g}")
        for key, text in result.notes.items():
            lines.append((f"{name}: {key}", text))
        if shown:
            lines.append((name, "; ".join(shown)))
    return lines
