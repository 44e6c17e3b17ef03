"""Export: a Hugging Face folder (safetensors + config.json + tokenizer) that transformers
loads as the family's *ForCausalLM class, verified by comparing logits with ours.

`format: auto` (the default) exports to Hugging Face when the family's transformers layout
holds every design choice of the model, and otherwise writes our own documented layout
(docs/CONTRACTS.md: config.json + model.safetensors + tokenizer.json) and records why."""

from __future__ import annotations

from pathlib import Path

from llm_lifecycle.workflows.stage import StageContext, StageResult, UserError


def verify_with_transformers(model_dir: Path, hf_dir: Path) -> tuple[str, float]:
    """(architecture transformers loaded, max |logit difference| vs ours) on a fixed prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm_lifecycle.models.load import load_model

    ours, _ = load_model(model_dir)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.arange(3, 35).remainder(ours.cfg.vocab_size).unsqueeze(0)
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    return type(theirs).__name__, diff


def export_model(ref: str, out: Path) -> str:
    from llm_lifecycle.models.hf import export_hf
    from llm_lifecycle.workflows.model_ref import resolve_model_dir

    model_dir = resolve_model_dir(ref)
    try:
        export_hf(model_dir, out)
    except ValueError as err:
        raise UserError(f"cannot export {ref}: {err}") from None
    arch, _ = verify_with_transformers(model_dir, out)
    return arch


FORMATS = ("auto", "hf", "native")


def hf_blocker(model_dir: Path) -> str | None:
    """Why this model has no Hugging Face layout, or None when it has one."""
    import json

    from llm_lifecycle.models.config import ModelConfig
    from llm_lifecycle.models.hf import check_exportable

    try:
        check_exportable(ModelConfig.from_dict(json.loads((model_dir / "config.json").read_text())["model"]))
    except ValueError as err:
        return str(err)
    return None


def run(ctx: StageContext, cfg: dict) -> StageResult:
    import shutil

    from llm_lifecycle.models.checkpoint import atomic_dir
    from llm_lifecycle.models.hf import export_hf

    if cfg["format"] not in FORMATS:
        raise UserError(f"stages.export.format: '{cfg['format']}' is not one of {', '.join(FORMATS)}")
    model_dir = ctx.upstream_output("rl", "model")
    fmt, blocker = cfg["format"], hf_blocker(model_dir)
    if fmt == "hf" and blocker:
        raise UserError(f"stages.export.format hf: {blocker}; use format auto or native")
    if fmt == "native" or (fmt == "auto" and blocker):
        out = ctx.stage_dir / "native"
        with atomic_dir(out) as tmp:
            for item in model_dir.iterdir():
                shutil.copy2(item, tmp / item.name)
        ctx.tracker.set_tags({"export.format": "llm-lifecycle", "export.hf_unavailable": blocker or "not asked"})
        if blocker:
            ctx.progress.log(f"  [yellow]no Hugging Face layout: {blocker}; exported in our own format[/yellow]")
        ctx.tracker.log_artifact(out, "native")
        return StageResult(outputs={"native": str(out)}, metrics={})
    out = ctx.stage_dir / "hf"
    export_hf(model_dir, out)
    metrics = {}
    if cfg["verify"]:
        arch, diff = verify_with_transformers(model_dir, out)
        ctx.tracker.set_tags({"export.architecture": arch, "export.format": "hf"})
        metrics["max_logit_diff"] = diff
        if diff > 1e-3:
            raise RuntimeError(f"exported model disagrees with ours: max |Δlogit| = {diff:.3g}")
    ctx.tracker.log_artifact(out, "hf")
    return StageResult(outputs={"hf": str(out)}, metrics=metrics)
