"""Export: a Hugging Face folder (safetensors + config.json + tokenizer) that transformers
loads as LlamaForCausalLM / Qwen3MoeForCausalLM, verified by comparing logits with ours."""

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


def run(ctx: StageContext, cfg: dict) -> StageResult:
    from llm_lifecycle.models.hf import export_hf

    if cfg["format"] != "hf":
        raise UserError(f"stages.export.format: '{cfg['format']}' is not available; use hf")
    model_dir = ctx.upstream_output("rl", "model")
    out = ctx.stage_dir / "hf"
    export_hf(model_dir, out)
    metrics = {}
    if cfg["verify"]:
        arch, diff = verify_with_transformers(model_dir, out)
        ctx.tracker.set_tags({"export.architecture": arch})
        metrics["max_logit_diff"] = diff
        if diff > 1e-3:
            raise RuntimeError(f"exported model disagrees with ours: max |Δlogit| = {diff:.3g}")
    ctx.tracker.log_artifact(out, "hf")
    return StageResult(outputs={"hf": str(out)}, metrics=metrics)
