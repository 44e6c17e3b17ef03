"""Export: a Hugging Face folder (verified against transformers' logits), a GGUF file for
llama.cpp/Ollama with a Modelfile beside it (verified against llama.cpp's logits when
llama-cpp-python is installed), or our own safetensors model folder.

`format: auto` (the default) exports to Hugging Face when the family's transformers layout
holds every design choice of the model, and otherwise writes our own documented layout
(docs/CONTRACTS.md: config.json + model.safetensors + tokenizer.json) and records why."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from llm_lifecycle.models.gguf import GGUF_TYPES
from llm_lifecycle.workflows.runner.settings import Settings, setting
from llm_lifecycle.workflows.runner.stage import (
    Port,
    StageContext,
    StageKind,
    StageResult,
    UserError,
    atomic_dir,
)

FORMATS = ("auto", "hf", "gguf", "safetensors")
PROBE_IDS = torch.arange(3, 35)  # the fixed prompt both sides score


def verify_with_transformers(model_dir: Path, hf_dir: Path) -> tuple[str, float]:
    """(architecture transformers loaded, max |logit difference| vs ours) on a fixed prompt."""
    from transformers import AutoModelForCausalLM

    from llm_lifecycle.models.load import load_model

    ours, _ = load_model(model_dir)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = PROBE_IDS.remainder(ours.cfg.vocab_size).unsqueeze(0)
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    return type(theirs).__name__, diff


@contextmanager
def llama_cpp_quiet():
    """llama.cpp's log off, then llama-cpp-python's back: 0.3.36 numbers the levels of the
    llama.cpp it ships as an older one did (its WARN read as ERROR), so verbose=False still
    prints warnings, such as a context past the file's length (llama.cpp rounds contexts up
    to 256 tokens). Its failures still raise."""
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    llama_cpp.llama_log_set(_silent_log(), ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


@cache
def _silent_log():
    import llama_cpp

    return llama_cpp.llama_log_callback(lambda level, text, user_data: None)  # cached: llama.cpp keeps the pointer


def llama_cpp_logits(gguf_file: Path, ids: list[int], n_ctx: int | None = None):
    """llama.cpp's logits [len(ids), vocab] for a prompt of token ids (llama-cpp-python), in a
    context of `n_ctx` tokens (default: the prompt's length; LongRoPE's factors depend on it)."""
    import numpy as np
    from llama_cpp import Llama

    with llama_cpp_quiet():
        llm = Llama(model_path=str(gguf_file), n_ctx=n_ctx or max(64, len(ids)), logits_all=True, n_threads=1,
                    verbose=False)
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)])
        llm.close()
    return logits


def verify_gguf(model_dir: Path, gguf_file: Path) -> float:
    """max |logit difference| between llama.cpp running the GGUF file and us, on a fixed prompt."""
    from llm_lifecycle.models.load import load_model

    ours, _ = load_model(model_dir)
    ids = PROBE_IDS.remainder(ours.cfg.vocab_size)
    with torch.no_grad():
        want = ours(ids.unsqueeze(0)).logits[0].numpy()
    return float(abs(llama_cpp_logits(gguf_file, ids.tolist()) - want).max())


def write_gguf_folder(model_dir: Path, out: Path, gguf_type: str, name: str) -> Path:
    """out/<name>-<type>.gguf and out/Modelfile (Ollama); returns the GGUF file."""
    from llm_lifecycle.models.checkpoint import read_config
    from llm_lifecycle.models.gguf import ollama_modelfile, write_gguf
    from llm_lifecycle.models.load import load_model

    if "quantization" in read_config(model_dir):
        raise UserError(f"{model_dir} is already quantized; export the full-precision model to GGUF "
                        "(e.g. models:/NAME@rl) and choose the GGUF type with --gguf-type q8_0|q4_0")
    model, tokenizer = load_model(model_dir)
    if tokenizer is None:
        raise UserError(f"{model_dir}: no tokenizer.json; a GGUF file embeds the tokenizer")
    filename = f"{name}-{gguf_type}.gguf"
    system_prompt = read_config(model_dir).get("system_prompt")
    try:
        with atomic_dir(out) as tmp:
            write_gguf(tmp / filename, model.cfg, model.state_dict(), tokenizer, gguf_type, name, system_prompt)
            (tmp / "Modelfile").write_text(ollama_modelfile(filename, system_prompt), encoding="utf-8")
    except ValueError as err:
        raise UserError(f"cannot export {model_dir} to GGUF: {err}") from None
    return out / filename


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


def copy_model_dir(model_dir: Path, out: Path) -> None:
    """Our own layout: config.json, model.safetensors, tokenizer.json (quantized or not)."""
    with atomic_dir(out) as tmp:
        for file in Path(model_dir).iterdir():
            if file.is_file():
                shutil.copyfile(file, tmp / file.name)  # contents only: new files get the user's permissions


def _write_export(model_dir: Path, ref: str, staged: Path, out: Path, fmt: str, gguf_type: str) -> str:
    """Write the export into the folder `staged` (replacing it), which becomes `out`; returns
    the line saying what was written."""
    from llm_lifecycle.models.hf import export_hf

    if fmt == "gguf":
        write_gguf_folder(model_dir, staged, gguf_type, name=out.name)
        modelfile = out / "Modelfile"
        return f"{out / f'{out.name}-{gguf_type}.gguf'} and {modelfile} (ollama create NAME -f {modelfile})"
    if fmt == "safetensors":
        copy_model_dir(model_dir, staged)
        return f"{out} (config.json, model.safetensors, tokenizer.json)"
    try:
        export_hf(model_dir, staged)
    except ValueError as err:
        raise UserError(f"cannot export {ref}: {err}") from None
    arch, _ = verify_with_transformers(model_dir, staged)
    return f"{out} ({arch})"


def export_model(ref: str, out: Path, fmt: str = "hf", gguf_type: str = "f16", overwrite: bool = False) -> str:
    """Export any model reference into the folder `out` (workflows/outputs.py: never over a
    user's files); returns a line saying what was written."""
    from llm_lifecycle.workflows.refs import resolve_model_dir
    from llm_lifecycle.workflows.outputs import output_folder

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: not one of {', '.join(FORMATS)}")
    out = Path(out).absolute()
    with output_folder(out, overwrite, "llm export") as staged:  # checks `out` before a model is fetched
        model_dir = resolve_model_dir(ref)
        if fmt == "auto":
            fmt = "safetensors" if hf_blocker(model_dir) else "hf"
        return _write_export(model_dir, ref, staged, out, fmt, gguf_type)  # the writers replace `staged` whole


@dataclass
class ExportSettings(Settings):
    format: str = setting("auto", "auto: hf when transformers has the layout, else ours; hf; gguf; "
                                  "safetensors (ours)", choices=FORMATS)
    verify: bool = setting(True, "check the export's logits against ours (transformers or llama.cpp)")
    gguf_type: str = setting("q8_0", "GGUF tensor type", choices=GGUF_TYPES)


def run(ctx: StageContext, cfg: ExportSettings) -> StageResult:
    from llm_lifecycle.models.hf import export_hf

    model_dir = ctx.input_path("model", "model")
    fmt, blocker = cfg.format, hf_blocker(model_dir)
    if fmt == "hf" and blocker:
        raise UserError(f"stages.{ctx.stage}.format hf: {blocker}; use format auto, gguf or safetensors")
    if fmt == "auto":
        fmt = "safetensors" if blocker else "hf"
        if blocker:
            ctx.progress.log(f"  [yellow]no Hugging Face layout: {blocker}; exported in our own format[/yellow]")
    metrics = {}
    if fmt == "gguf":
        out = ctx.stage_dir / "gguf"
        gguf_file = write_gguf_folder(model_dir, out, cfg.gguf_type, name=ctx.recipe.name)
        ctx.tracker.set_tags({"export.format": f"gguf-{cfg.gguf_type}"})
        if cfg.verify:
            try:
                metrics["max_logit_diff"] = verify_gguf(model_dir, gguf_file)
            except ImportError:
                ctx.progress.log("  llama-cpp-python is not installed: the GGUF file is not checked against llama.cpp")
    elif fmt == "safetensors":
        out = ctx.stage_dir / "safetensors"
        copy_model_dir(model_dir, out)
        ctx.tracker.set_tags({"export.format": "llm-lifecycle", "export.hf_unavailable": blocker or "not asked"})
    else:
        out = ctx.stage_dir / "hf"
        export_hf(model_dir, out)
        ctx.tracker.set_tags({"export.format": "hf"})
        if cfg.verify:
            arch, diff = verify_with_transformers(model_dir, out)
            ctx.tracker.set_tags({"export.architecture": arch})
            metrics["max_logit_diff"] = diff
            if diff > 1e-3:
                raise RuntimeError(f"exported model disagrees with ours: max |Δlogit| = {diff:.3g}")
    ctx.tracker.log_artifact(out, fmt)
    return StageResult(outputs={fmt: str(out)}, metrics=metrics)


KIND = StageKind("export", ExportSettings, run, inputs=(Port("model", "model"),))
