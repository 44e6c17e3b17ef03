"""Stage data-fetch: the recipe's sources into one documents file (workflows/data/sources.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_lifecycle.workflows.data.sources import fetch_source, metric_label, parse_sources, resolve_source
from llm_lifecycle.workflows.runner.settings import Settings, setting
from llm_lifecycle.workflows.runner.stage import StageContext, StageKind, StageResult, UserError, atomic_path


@dataclass
class DataFetchSettings(Settings):
    sources: list[Any] = setting([{"uri": "builtin:corpus"}],
                                 "each {uri, weight, group, text_field, limit, split, revision, allow_patterns}: "
                                 "builtin:NAME, a local file or folder, or hf://datasets/OWNER/NAME (docs/data.md)")

    def check(self, where: str, upstream: dict[str, Any]) -> None:
        # A bad source is a one-line error now, not mid-pipeline; hub sources are looked up when fetched.
        for i, source in enumerate(parse_sources(self.sources, where)):
            if not source.uri.startswith("hf://"):
                resolve_source(source, f"{where}.sources[{i}]")


def run(ctx: StageContext, cfg: DataFetchSettings) -> StageResult:
    """Every source into one `documents.jsonl`."""
    sources = parse_sources(cfg.sources, f"stages.{ctx.stage}")
    # Resolve every source before reading any, so a bad path fails in a second, not after a download.
    paths = [resolve_source(s, f"stages.{ctx.stage}.sources[{i}]") for i, s in enumerate(sources)]
    out = ctx.stage_dir / "documents.jsonl"
    all_stats = []
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for source, path in zip(sources, paths):
            ctx.tracker.log_input(path, name=source.uri, context=ctx.stage)
            all_stats.append(fetch_source(source, path, f, seed=ctx.seed, progress=ctx.progress))
    metrics: dict[str, float] = {}
    for s in all_stats:
        label = metric_label(s.uri)
        for name, value in (("docs", s.docs), ("chars", s.chars), ("weighted_docs", s.weighted_docs)):
            metrics[f"fetch.{label}.{name}"] = metrics.get(f"fetch.{label}.{name}", 0) + value
        ctx.progress.log(f"  {s.uri}: {s.docs} documents, {s.chars:,} characters")
    for name in ("docs", "chars", "weighted_docs"):
        metrics[f"fetch.{name}"] = sum(getattr(s, name) for s in all_stats)
    if metrics["fetch.weighted_docs"] == 0:
        raise UserError(f"{ctx.stage} read no documents; check stages.{ctx.stage}.sources (paths, text_field, weight)")
    return StageResult(outputs={"documents": str(out)}, metrics=metrics)




KIND = StageKind("data-fetch", DataFetchSettings, run, output="documents")
