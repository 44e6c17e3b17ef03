"""Stage data-clean: quality rules, language id, dedup and the held-out split (workflows/data/clean.py)."""

from __future__ import annotations

from llm_lifecycle.workflows.data.clean import CleanConfig, clean_documents, read_documents, write_documents
from llm_lifecycle.workflows.runner.stage import Port, StageContext, StageKind, StageResult, UserError, write_json_atomic


def run(ctx: StageContext, config: CleanConfig) -> StageResult:
    """`clean.jsonl` (training, mixture repeats applied), `heldout.jsonl`, `report.json`."""
    documents_path = ctx.input_path("documents", "documents")
    ctx.tracker.log_input(documents_path, name="documents", context=ctx.stage)
    docs = read_documents(documents_path)
    if config.engine == "datatrove":
        try:
            from llm_lifecycle.workflows.data.clean_datatrove import clean_with_datatrove
        except ImportError:
            raise UserError(
                f"stages.{ctx.stage}.engine: datatrove is not installed; `pip install datatrove` or use engine: local"
            ) from None
        with ctx.progress.task(f"clean on datatrove ({config.datatrove_tasks} tasks)"):
            result = clean_with_datatrove(docs, config, ctx.stage_dir / "datatrove", config.datatrove_tasks)
    else:
        result = clean_documents(docs, config, ctx.progress)
    if not result.train:
        raise UserError(
            f"{ctx.stage} removed all {len(docs)} documents; loosen stages.{ctx.stage} "
            "(min_chars, max_chars, rules, minhash_threshold) or add data"
        )
    clean_path, heldout_path = ctx.stage_dir / "clean.jsonl", ctx.stage_dir / "heldout.jsonl"
    train_lines = write_documents(clean_path, result.train, expand_repeats=True)
    write_documents(heldout_path, result.heldout, expand_repeats=False)
    report = {
        "input_documents": len(docs),
        "kept": len(result.train) + len(result.heldout),
        "train_documents": len(result.train),
        "train_lines": train_lines,
        "heldout_documents": len(result.heldout),
        "steps": {name: {"removed": s.removed, "examples": s.examples} for name, s in result.steps.items()},
    }
    report_path = ctx.stage_dir / "report.json"
    write_json_atomic(report_path, report)
    ctx.tracker.log_dict(report, "report.json")
    metrics = {
        "clean.input": len(docs),
        "clean.kept": report["kept"],
        "clean.train": len(result.train),
        "clean.train_lines": train_lines,
        "clean.heldout": len(result.heldout),
        "clean.train_chars": sum(len(d.text) * d.repeat for d in result.train),
        **{f"clean.removed.{name}": s.removed for name, s in result.steps.items()},
    }
    removed = ", ".join(f"{n} {s.removed}" for n, s in result.steps.items() if s.removed)
    kept = f"kept {report['kept']} of {len(docs)} documents ({len(result.heldout)} held out)"
    ctx.progress.log(f"  {kept}; removed: {removed or 'none'}")
    return StageResult(
        outputs={"clean": str(clean_path), "heldout": str(heldout_path), "report": str(report_path)},
        metrics=metrics,
    )


KIND = StageKind("data-clean", CleanConfig, run, inputs=(Port("documents", "documents"),), output="text")
