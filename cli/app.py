"""`llm`: the command line. Parses, validates, calls a workflow, prints. No ML here.

Heavy libraries (torch, mlflow, lm-eval) are imported inside the commands so that
`llm --help` stays fast.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer vendors click
from typer.core import TyperCommand, TyperGroup

from llm_lifecycle.registry.tracking import EnvironmentProblem
from llm_lifecycle.workflows.runner.stage import UserError

console = Console()
# In a log file a line stays one line (a path split at column 80 greps badly); terminals wrap.
console.soft_wrap = not console.is_terminal
err_console = Console(stderr=True)
# --think / --no-think / neither -> the thinking mode (models/chat_markup.py THINKING_MODES)
THINKING_SWITCH = {None: "", True: "think", False: "no_think"}


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


class _OneLineErrors(TyperGroup):
    """Every mistake a user can make (a bad option, a bad recipe, a missing file) ends as
    one line on stderr and exit code 2, whoever calls the app (the `llm` script or a test)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _quiet_mlflow()
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as err:
            err.show()
            sys.exit(0)
        except ClickException as err:  # usage: an unknown option, a missing argument, a bad value
            command = err.ctx.command_path if getattr(err, "ctx", None) else "llm"
            _fail(f"{command}: {err.format_message().rstrip('.')}; see `{command} --help`", err.exit_code)
        except typer.Abort:
            _fail("aborted", 1)
        except (UserError, EnvironmentProblem) as err:
            _fail(str(err))
        except OSError as err:
            message = _write_failure(err)
            if message is None:
                raise
            _fail(message)
        if code == 130:
            err_console.print("[yellow]interrupted; re-run the same command to resume[/yellow]")
        sys.exit(code if isinstance(code, int) else 0)


def _write_failure(err: OSError) -> str | None:
    """The line for a write the machine refused (a full disk, a read-only or foreign folder),
    or None for any other OSError (a bug: its traceback is wanted)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device writing {err.filename or 'a file'} ({_free_space(err.filename)} free "
                "there); free some space and re-run: what was written is complete or absent, so the run resumes")
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and err.filename:
        return f"cannot write {err.filename}: {err.strerror}; choose a folder you can write"
    return None


def _free_space(filename: str | None) -> str:
    from llm_lifecycle.workflows.engine.memory import format_bytes

    folder = Path(filename or ".").absolute()
    while not folder.exists():
        folder = folder.parent
    return format_bytes(shutil.disk_usage(folder).free)


app = typer.Typer(
    cls=_OneLineErrors,
    help="Take a language model through its whole life; every stage an MLflow run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Fetch and clean training text.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train a tokenizer.", no_args_is_help=True)
recipes_app = typer.Typer(help="The shipped recipes.", no_args_is_help=True)
models_app = typer.Typer(help="The MLflow Model Registry.", no_args_is_help=True)
runs_app = typer.Typer(help="Tracked runs.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(recipes_app, name="recipes")
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")

SetOption = typer.Option(None, "--set", help="Override a recipe value: stage.key=value (repeatable).")
RecipeOption = typer.Option(..., "--recipe", "-r", help="Recipe name (llm recipes list) or path to a .yaml.")
InitOption = typer.Option(
    None, "--init", help="Start from this model: a Hugging Face folder or hub id, models:/NAME@ALIAS, or our folder."
)
NprocOption = typer.Option(1, "--nproc", help="Processes per node: >1 runs under torchrun with FSDP2.")
NnodesOption = typer.Option(1, "--nnodes", help="Nodes taking part (torchrun).")
RdzvOption = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the torchrun rendezvous (multi-node).")
WaitOption = typer.Option(False, "--wait", help="If another llm process is running this recipe, queue behind it.")


def _relaunch(nproc: int, nnodes: int, rdzv_endpoint: str | None) -> None:
    from llm_lifecycle.workflows.engine.launch import relaunch_if_asked

    relaunch_if_asked(nproc, nnodes, rdzv_endpoint)


def _workspace() -> Path:
    from llm_lifecycle.registry.tracking import workspace

    return workspace()


def _run_stages(recipe_name: str, overrides: list[str] | None, wait: bool, **plan_args) -> None:
    from llm_lifecycle.cli.progress import console_progress
    from llm_lifecycle.workflows.engine.ranks import is_main_process
    from llm_lifecycle.workflows.runner.pipeline import run_pipeline
    from llm_lifecycle.workflows.runner.recipe import load_recipe
    from llm_lifecycle.workflows.runner.stage import SilentProgress

    recipe = load_recipe(recipe_name, overrides or [])
    # Under torchrun every rank runs this; rank 0 alone speaks for the job.
    progress = console_progress(console) if is_main_process() else SilentProgress()
    results = run_pipeline(recipe, _workspace(), progress, wait=wait, **plan_args)
    if is_main_process():
        _print_results(recipe, results, plan_args.get("stages"))


def _print_results(recipe, results: dict, stages) -> None:
    """What each stage did: its held-out metric before -> after, each eval suite's score, notes
    (plain lines, unwrapped, so a log file reads as well as a terminal)."""
    from llm_lifecycle.workflows.runner.summary import summary_lines

    if stages:
        chosen = stages if isinstance(stages, list) else stages.split(",")
        results = {name: result for name, result in results.items() if name in chosen}
    lines = summary_lines(results, {name: instance.kind for name, instance in recipe.instances.items()})
    width = max((len(stage) for stage, _ in lines), default=0)
    console.print(f"[bold]{recipe.name}: summary[/bold]")
    for stage, text in lines:
        console.print(f"  {stage:<{width}}  {escape(text)}", highlight=False, soft_wrap=True)
    from llm_lifecycle.registry.tracking import tracking_uri

    console.print(f"Tracking store: {tracking_uri()}  (browse with `llm ui`)")


@app.command()
def pipeline(
    recipe: str = typer.Argument(..., help="Recipe name (llm recipes list) or path to a .yaml."),
    stages: Optional[str] = typer.Option(None, help="Comma-separated stages to run (default: all)."),
    from_stage: Optional[str] = typer.Option(None, "--from", help="Run this stage and every later one."),
    force: Optional[List[str]] = typer.Option(None, help="Re-run this stage (and those after it) even if cached."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, the cache state and memory estimate."),
    init: Optional[str] = InitOption,
    data_dir: Optional[str] = typer.Option(
        None, envvar="LLM_EVAL_DATA",
        help="Benchmarks in their official layouts for the eval stage (eval.data_dir); suites it lacks come "
        "from the shipped mirror or the hub.",
    ),
    set_: Optional[List[str]] = SetOption,
    nproc: int = NprocOption,
    nnodes: int = NnodesOption,
    rdzv_endpoint: Optional[str] = RdzvOption,
    wait: bool = WaitOption,
) -> None:
    """Run the whole lifecycle (or some stages) of RECIPE; completed stages are reused.
    With --init the pipeline starts from that model at SFT (its tokenizer replaces training one)."""
    set_ = [*(set_ or []), *([f"sft.init={init}"] if init else []), *([f"eval.data_dir={data_dir}"] if data_dir else [])]
    if dry_run:
        _print_plan(recipe, set_ or [], stages, from_stage, tuple(force or ()))
        return
    _relaunch(nproc, nnodes, rdzv_endpoint)
    _run_stages(recipe, set_, wait, stages=stages, from_stage=from_stage, force=tuple(force or ()))


def _print_plan(recipe_name, overrides, stages, from_stage, force) -> None:
    from llm_lifecycle.workflows.runner.pipeline import plan
    from llm_lifecycle.workflows.runner.planning import memory_report
    from llm_lifecycle.workflows.runner.recipe import load_recipe

    recipe = load_recipe(recipe_name, overrides)
    table = Table(title=f"plan for {recipe.name} ({recipe.path})")
    for col in ("stage", "kind", "inputs", "fingerprint", "status"):
        table.add_column(col)
    for p in plan(recipe, _workspace(), stages, from_stage, force):
        status = "cached" if p.cached else ("run" if p.selected else "skip")
        style = {"cached": "green", "run": "bold yellow", "skip": "dim"}[status]
        inputs = ", ".join(f"{port} <- {source}" for port, source in p.sources.items()) or "-"
        table.add_row(p.name, p.kind, inputs, p.fingerprint, f"[{style}]{status}[/{style}]")
    console.print(table)
    for line in memory_report(recipe):
        console.print(line)


def settings_help(kind: str) -> str:
    """A stage kind's settings as --help text: the same list recipe validation, `llm recipes
    kinds` and docs/settings.md come from (workflows/runner/settings.py `field_help`)."""
    from llm_lifecycle.workflows import stages
    from llm_lifecycle.workflows.runner.settings import field_help

    lines = [f"Settings of a {kind} stage (in the recipe, or --set STAGE.KEY=VALUE):"]
    for row in field_help(stages.kind(kind).settings):
        allowed = f" [{row['allowed']}]" if row["allowed"] else ""
        lines.append(f"  {row['name']} ({row['type']}, default {row['default']!r}){allowed}: {row['help']}")
    return "\n".join(lines)


def _kind_help(kind: str) -> type[TyperCommand]:
    """A command class whose --help ends with the kind's settings, read only when help is asked
    for: importing every kind's module up front (most bring torch) would slow each start by seconds."""

    class KindCommand(TyperCommand):
        def format_help(self, ctx, formatter) -> None:
            self.epilog = escape(settings_help(kind))
            return super().format_help(ctx, formatter)

    return KindCommand


StageOption = typer.Option(None, "--stage", help="Which stage of this kind (a recipe may have several; "
                                                  "default: the one named after the kind, or the only one).")
FromOption = typer.Option(None, "--from", help="Start from this stage's model (a stage of the recipe) or any "
                                               "model: models:/NAME@ALIAS, a folder, a Hugging Face repo id.")


def _instance(recipe_name: str, overrides: list[str], kind: str, name: str | None) -> str:
    """The recipe stage a standalone command runs: `name`, the one named after `kind`, or its only one."""
    from llm_lifecycle.workflows.runner.recipe import load_recipe

    recipe = load_recipe(recipe_name, overrides)
    of_kind = [n for n, inst in recipe.instances.items() if inst.kind == kind]
    if name is not None:
        if name not in of_kind:
            raise UserError(f"--stage {name}: recipe {recipe.name} has no {kind} stage of that name; "
                            f"its {kind} stages: {', '.join(of_kind) or 'none'}")
        return name
    if kind in of_kind or len(of_kind) == 1:
        return kind if kind in of_kind else of_kind[0]
    raise UserError(f"recipe {recipe.name} has {len(of_kind)} {kind} stages ({', '.join(of_kind) or 'none'}); "
                    f"choose one with --stage NAME")


def _from_overrides(recipe_name: str, overrides: list[str], stage: str, source: str | None) -> list[str]:
    """--from: a stage of the recipe feeds this one's model input; anything else is a model reference."""
    from llm_lifecycle.workflows.runner.recipe import load_recipe

    if source is None:
        return []
    if source in load_recipe(recipe_name, overrides).instances:
        return [f"{stage}.from=[{source}]"]
    return [f"{stage}.init={source}"]


def _run_kind(recipe: str, kind: str, set_: list[str] | None, stage: str | None, wait: bool, overrides=(),
              source=None) -> None:
    name = _instance(recipe, list(set_ or []), kind, stage)
    given = [*(set_ or []), *(f"{name}.{o}" for o in overrides)]
    _run_stages(recipe, [*given, *_from_overrides(recipe, given, name, source)], wait, stages=[name])


def _stage_command(kind: str, doc: str):
    def command(recipe: str = RecipeOption, stage: Optional[str] = StageOption,
                set_: Optional[List[str]] = SetOption, wait: bool = WaitOption) -> None:
        _run_kind(recipe, kind, set_, stage, wait)

    command.__doc__ = doc
    return command


def _training_command(kind: str, doc: str):
    """A training stage; --nproc etc. run it under torchrun; --from starts it from another
    stage's model or any model reference."""

    def command(
        recipe: str = RecipeOption,
        stage: Optional[str] = StageOption,
        from_: Optional[str] = FromOption,
        init: Optional[str] = typer.Option(None, "--init", hidden=True),  # the older spelling of --from MODEL
        set_: Optional[List[str]] = SetOption,
        nproc: int = NprocOption,
        nnodes: int = NnodesOption,
        rdzv_endpoint: Optional[str] = RdzvOption,
        wait: bool = WaitOption,
    ) -> None:
        _relaunch(nproc, nnodes, rdzv_endpoint)
        _run_kind(recipe, kind, set_, stage, wait, source=from_ or init)

    command.__doc__ = doc
    return command


def _add_stage_command(typer_app: typer.Typer, name: str, kind: str, make, doc: str) -> None:
    typer_app.command(name, cls=_kind_help(kind))(make(kind, doc))


_add_stage_command(data_app, "fetch", "data-fetch", _stage_command, "Fetch the recipe's data sources (builtin:, local, hf://).")
_add_stage_command(data_app, "clean", "data-clean", _stage_command, "Filter and deduplicate the fetched text.")


@tokenizer_app.command("train", cls=_kind_help("tokenizer-train"))
def tokenizer_train(
    recipe: str = RecipeOption,
    vocab_size: Optional[int] = typer.Option(None, help="Tokens in all, special ones included."),
    split_digits: Optional[bool] = typer.Option(None, "--split-digits/--no-split-digits", help="One token per digit."),
    whitespace_runs: Optional[int] = typer.Option(None, help="Runs of 2..N spaces as single tokens (0: none)."),
    byte_fallback: Optional[bool] = typer.Option(
        None, "--byte-fallback/--byte-level", help="Character BPE with <0xXX> byte fallback, or GPT-2 byte-level BPE."
    ),
    special_token: Optional[List[str]] = typer.Option(None, help="An extra control token (repeatable)."),
    extend: Optional[str] = typer.Option(None, help="Extend this tokenizer with tokens learned on the Chinese text."),
    pretrained: Optional[str] = typer.Option(None, help="Use this tokenizer as it is (file, folder, models:/, hub id)."),
    set_: Optional[List[str]] = SetOption,
    wait: bool = WaitOption,
) -> None:
    """Train a BPE tokenizer (options from the Qwen / LLaMA / Chinese-LLaMA reports) or take a pretrained one."""
    import json

    given = {"vocab_size": vocab_size, "split_digits": split_digits, "whitespace_runs": whitespace_runs,
             "byte_fallback": byte_fallback, "special_tokens": special_token, "extend": extend, "pretrained": pretrained}
    overrides = [f"{k}={json.dumps(v)}" for k, v in given.items() if v is not None]
    _run_kind(recipe, "tokenizer-train", set_, None, wait, overrides)


_add_stage_command(app, "tokenize", "tokenize", _stage_command, "Encode the clean text into memory-mapped token shards.")
_add_stage_command(app, "pretrain", "pretrain", _training_command,
                   "Pretrain the recipe's model from scratch (or continue a --from model).")
_add_stage_command(app, "extend-context", "extend-context", _training_command, "Extend the context length (RoPE base / YaRN).")
_add_stage_command(app, "sft", "sft", _training_command, "Supervised fine-tuning on chat data (ChatML, assistant-only loss).")
_add_stage_command(app, "distill", "distill", _training_command,
                   "Distil a teacher's sampled solutions into a student (DeepSeek-R1).")


@app.command(cls=_kind_help("quantize"))
def quantize(
    recipe: str = RecipeOption,
    method: Optional[str] = typer.Option(None, help="rtn | gptq | awq (gptq and awq calibrate on training text)."),
    bits: Optional[int] = typer.Option(None, help="8 or 4."),
    group_size: Optional[int] = typer.Option(None, help="Input columns per scale, e.g. 128; 0: one per output row."),
    set_: Optional[List[str]] = SetOption,
    wait: bool = WaitOption,
) -> None:
    """Weight-only quantization of the recipe's final model; registers it as @int8 / @int4."""
    given = {"method": method, "bits": bits, "group_size": group_size}
    overrides = [f"{k}={v}" for k, v in given.items() if v is not None]
    _run_kind(recipe, "quantize", set_, None, wait, overrides)


@app.command(cls=_kind_help("rl"))
def rl(
    recipe: str = RecipeOption,
    method: Optional[str] = typer.Option(None, help="rm, dpo, ppo, grpo, rs-sft or iterative-dpo "
                                                    "(default: the recipe's)."),
    stage: Optional[str] = StageOption,
    from_: Optional[str] = FromOption,
    set_: Optional[List[str]] = SetOption,
    nproc: int = NprocOption,
    nnodes: int = NnodesOption,
    rdzv_endpoint: Optional[str] = RdzvOption,
    wait: bool = WaitOption,
) -> None:
    """Align a model (the recipe's SFT model, or --from any): reward model, DPO, PPO, GRPO,
    rejection-sampling SFT or online iterative DPO. The model is registered as
    models:/RECIPE@STAGE and @METHOD."""
    _relaunch(nproc, nnodes, rdzv_endpoint)
    _run_kind(recipe, "rl", set_, stage, wait, [f"method={method}"] if method else [], source=from_)


@app.command()
def chat(
    model: str = typer.Option(..., help="models:/NAME@ALIAS, a local checkpoint folder, or a HF repo id."),
    system: Optional[str] = typer.Option(None, help="System prompt (default: the one the model was fine-tuned with, "
                                         "as its folder records; \"\" for none)."),
    temperature: float = typer.Option(0.7, min=0.0),
    top_p: float = typer.Option(0.9, min=0.0, max=1.0),
    max_new_tokens: int = typer.Option(128, min=1),
    prompt: Optional[List[str]] = typer.Option(None, help="Say this (repeatable) and exit instead of reading stdin."),
    think: Optional[bool] = typer.Option(None, "--think/--no-think", help="End each message with /think or "
                                         "/no_think (Qwen3's thinking modes); default: neither."),
    thinking_budget: int = typer.Option(0, help="At most this many thinking tokens per reply, then </think> "
                                        "is forced; 0: no limit."),
) -> None:
    """Talk to a model in ChatML; an empty line or Ctrl-D ends the chat."""
    if not 0 < top_p <= 1:
        raise UserError(f"llm chat --top-p {top_p}: must be in (0, 1]")
    if thinking_budget < 0:
        raise UserError(f"llm chat --thinking-budget {thinking_budget}: must be >= 0 (0: no limit)")
    from llm_lifecycle.workflows.serving.chat import ChatSession

    session = ChatSession(model, system, temperature, top_p, max_new_tokens, seed=0, thinking=THINKING_SWITCH[think],
                          thinking_budget=thinking_budget)
    turns = iter(prompt) if prompt else None
    while True:
        if turns is not None:
            text = next(turns, "")
            console.print(f"[bold]you>[/bold] {text}" if text else "", highlight=False)
        else:
            try:
                text = console.input("[bold]you>[/bold] ")
            except EOFError:
                text = ""
        if not text.strip():
            return
        console.print(f"[bold cyan]model>[/bold cyan] {session.reply(text)}", highlight=False)


@app.command("eval", cls=_kind_help("eval"))
def eval_(
    model: Optional[str] = typer.Option(None, help="models:/NAME@ALIAS, a local checkpoint folder, or a HF repo id."),
    suite: List[str] = typer.Option(["mmlu"], help="Suite(s): mmlu, gsm8k, ceval, cmmlu, ppl, long (repeatable)."),
    data_dir: Optional[str] = typer.Option(
        None, envvar="LLM_EVAL_DATA",
        help="Local copy of the benchmarks in their official layouts ('builtin' for the shipped mirror); "
        "default: the Hugging Face hub.",
    ),
    limit: Optional[int] = typer.Option(None, help="Evaluate at most N examples per task (per subject)."),
    num_fewshot: Optional[int] = typer.Option(None, min=0, help="Few-shot examples (default: the suite's, 5)."),
    batch_size: int = typer.Option(8, min=1, help="Batch size for scoring and generation."),
    backend: str = typer.Option("ours", help="ours (our adapter), hf or vllm (lm-eval's own, on an HF export)."),
    apply_chat_template: bool = typer.Option(False, "--apply-chat-template", help="Prompt in the chat template."),
    think: Optional[bool] = typer.Option(None, "--think/--no-think", help="With --apply-chat-template: end each "
                                         "prompt with /think or /no_think (Qwen3's thinking modes)."),
    thinking_budget: int = typer.Option(0, help="At most this many thinking tokens per generated answer; 0: no limit."),
    seed: int = typer.Option(0, help="Seed for few-shot sampling and generation."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Run the recipe's eval stage instead."),
    set_: Optional[List[str]] = SetOption,
    wait: bool = WaitOption,
) -> None:
    """Evaluate a model with lm-eval suites (MMLU, GSM8K, C-Eval, CMMLU), perplexity and long-context probes."""
    if recipe:
        _run_kind(recipe, "eval", set_, None, wait)
        return
    if not model:
        raise UserError("llm eval: give --model (models:/NAME@ALIAS, a folder or a HF id) or --recipe")
    if limit is not None and limit < 1:
        raise UserError(f"llm eval: --limit must be a positive number of examples, got {limit}")
    if thinking_budget < 0:
        raise UserError(f"llm eval: --thinking-budget must be >= 0 (0: no limit), got {thinking_budget}")
    if think is not None and not apply_chat_template:
        raise UserError("llm eval: --think/--no-think end a chat turn; add --apply-chat-template")
    from llm_lifecycle.cli.progress import console_progress
    from llm_lifecycle.workflows.stages.evaluate import evaluate_model

    outcome = evaluate_model(model, suite, data_dir=data_dir, limit=limit, num_fewshot=num_fewshot,
                             batch_size=batch_size, backend=backend, seed=seed, apply_chat_template=apply_chat_template,
                             progress=console_progress(console), thinking=THINKING_SWITCH[think],
                             thinking_budget=thinking_budget)
    metrics = sorted({k for row in outcome.rows for k in row} - {"task", "group", "n"})
    table = Table(title=f"eval of {model} ({backend} backend)")
    table.add_column("task")
    table.add_column("n", justify="right")
    for name in metrics:
        table.add_column(name, justify="right")
    for row in outcome.rows:
        table.add_row(row["task"], str(row["n"] or ""), *(f"{row[m]:.4f}" if m in row else "" for m in metrics))
    console.print(table)
    linked = f"; linked to {outcome.model_version_uri}" if outcome.model_version_uri else ""
    console.print(f"MLflow run {outcome.run_id}{linked}; per-subject tables under its artifacts eval/<suite>/")


@app.command(cls=_kind_help("export"))
def export(
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Run the recipe's export stage."),
    model: Optional[str] = typer.Option(None, help="Or export this model (models:/…, folder) ..."),
    out: Optional[Path] = typer.Option(None, help="... into this folder (new or empty)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export in --out (never other files)."),
    format_: Optional[str] = typer.Option(None, "--format", help="auto (hf if transformers has the layout, else ours; default) | hf | gguf (llama.cpp, Ollama) | safetensors (ours)."),
    gguf_type: Optional[str] = typer.Option(None, help="GGUF weights: f32 | f16 (default) | q8_0 | q4_0."),
    set_: Optional[List[str]] = SetOption,
    wait: bool = WaitOption,
) -> None:
    """Export to a Hugging Face folder, a GGUF file with an Ollama Modelfile, or our safetensors folder."""
    if recipe:
        given = {"format": format_, "gguf_type": gguf_type}
        _run_kind(recipe, "export", set_, None, wait, [f"{k}={v}" for k, v in given.items() if v])
        return
    if not (model and out):
        raise UserError("llm export: give --recipe, or both --model and --out")
    from llm_lifecycle.workflows.stages.export import export_model

    console.print(f"exported {model} to {export_model(model, out, format_ or 'auto', gguf_type or 'f16', overwrite)}")


@app.command("import")
def import_(
    source: str = typer.Argument(..., help="A Hugging Face folder (config.json + safetensors) or hub repo id."),
    out: Path = typer.Option(..., help="Write our model folder here (new or empty)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier import in --out (never other files)."),
) -> None:
    """Import a Hugging Face checkpoint (weights and tokenizer) as one of our model folders."""
    from llm_lifecycle.workflows.refs import import_into_user_folder

    cfg = import_into_user_folder(source, out, overwrite)
    console.print(f"imported {source} ({cfg.family}, {cfg.num_params() / 1e6:.1f}M parameters) to {out}")


@recipes_app.command("list")
def recipes_list() -> None:
    """The shipped recipes."""
    from llm_lifecycle.workflows.runner.recipe import RECIPES_DIR, list_recipes, read_yaml

    table = Table(title="recipes")
    table.add_column("name")
    table.add_column("description")
    for name in list_recipes():
        table.add_row(name, str(read_yaml(RECIPES_DIR / f"{name}.yaml").get("description", "")))
    console.print(table)


@recipes_app.command("show")
def recipes_show(name: str, set_: Optional[List[str]] = SetOption) -> None:
    """The fully resolved recipe (preset, overrides and defaults applied)."""
    from llm_lifecycle.workflows.runner.recipe import load_recipe

    console.print(load_recipe(name, set_ or []).to_yaml(), highlight=False)


@recipes_app.command("kinds")
def recipes_kinds(
    kind: Optional[str] = typer.Argument(None, help="One stage kind (default: all)."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the reference as Markdown (docs/settings.md)."),
) -> None:
    """The stage kinds a recipe can use: their inputs, output and every setting (type, default, allowed, help)."""
    from llm_lifecycle.workflows import stages as kinds
    from llm_lifecycle.workflows.runner.settings import field_help

    if kind is not None and kind not in kinds.MODULES:
        raise UserError(f"unknown stage kind {kind!r}; kinds are {', '.join(kinds.MODULES)}")
    if markdown:
        print(kinds.settings_reference([kind] if kind else list(kinds.MODULES)), end="")
        return
    for name in [kind] if kind else kinds.MODULES:
        spec = kinds.kind(name)
        table = Table(title=f"{name}: takes {kinds.describe_inputs(spec)}; outputs {spec.output or 'nothing later stages take'}")
        for col in ("setting", "type", "default", "allowed", "help"):
            table.add_column(col)
        for row in field_help(spec.settings):
            table.add_row(row["name"], row["type"], repr(row["default"]), row["allowed"], row["help"])
        console.print(table)


@models_app.command("list")
def models_list() -> None:
    """Registered models, their versions and aliases."""
    from llm_lifecycle.registry.catalog import registered_versions

    table = Table(title="registered models")
    for col in ("model", "version", "aliases", "stage", "created"):
        table.add_column(col)
    for row in registered_versions():
        table.add_row(row["name"], row["version"], ", ".join(row["aliases"]), row["stage"], row["created"])
    console.print(table)


@runs_app.command("list")
def runs_list(recipe: Optional[str] = typer.Option(None, "--recipe", "-r"), limit: int = 30) -> None:
    """Recent runs: pipelines and their stages."""
    from llm_lifecycle.registry.catalog import recent_runs

    table = Table(title="runs")
    for col in ("experiment", "run", "stage", "status", "started", "duration_s", "run_id"):
        table.add_column(col)
    for row in recent_runs(recipe, limit):
        table.add_row(*(str(row[c]) for c in ("experiment", "run", "stage", "status", "started", "duration_s", "run_id")))
    console.print(table)


def _serve_until_stopped(argv: list[str], env: dict | None = None) -> int:
    """Run MLflow's server (a process tree: the CLI, its server, the server's workers) until it
    exits or we are told to stop. The tree gets its own process group so that SIGTERM to us (a
    service manager, `kill`) or Ctrl-C stops all of it rather than orphaning workers that keep
    the port."""
    import subprocess

    server = subprocess.Popen(argv, env=env, start_new_session=True)

    def stop(*_):
        try:
            os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(0)))
    try:
        return server.wait()
    except KeyboardInterrupt:
        stop()
        return 0


@app.command()
def ui(port: int = typer.Option(5000, min=1, max=65535, help="Port to serve on."), host: str = typer.Option("127.0.0.1", help="Address to bind.")) -> None:
    """Open the MLflow UI on the workspace's tracking store."""
    import socket

    from llm_lifecycle.registry.tracking import configure, tracking_uri, workspace

    configure()  # creates the store, so the UI opens on an empty workspace too
    with socket.socket() as probe:
        if probe.connect_ex((host, port)) == 0:
            raise UserError(f"llm ui: port {port} on {host} is already in use; pass --port with a free one")
    uri = tracking_uri()
    console.print(f"MLflow UI: http://{host}:{port}  (store {uri}; Ctrl-C to stop)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--artifacts-destination", str(workspace() / "mlartifacts")]
    raise typer.Exit(_serve_until_stopped(cmd))


@app.command()
def compare(
    runs: List[str] = typer.Argument(..., help="Pipeline, sweep or stage run ids, or recipe names (latest pipeline)."),
    out: Optional[Path] = typer.Option(None, help="Folder for compare.png/.html/.json (default: workspace/reports/)."),
) -> None:
    """Compare pipelines: what differs, loss curves, eval scores (terminal table + PNG/HTML report)."""
    import time

    from llm_lifecycle.workflows.runner.compare import compare_runs

    out = out or _workspace() / "reports" / time.strftime("compare-%Y%m%d-%H%M%S")
    report, run_id = compare_runs(runs, out)
    table = Table(title="llm compare")
    table.add_column("")
    for r in report.runs:
        table.add_column(f"{r.label}\n{r.run_id[:8]}", justify="right")
    for key, values in report.differing_params.items():
        table.add_row(f"[bold]{key}[/bold]", *values)
    if report.differing_params:
        table.add_section()
    for key, values in report.metric_rows.items():
        table.add_row(key, *("—" if v is None else f"{v:.4g}" for v in values))
    console.print(table)
    console.print(f"report: {report.files['html']} and {report.files['png']} (logged to run {run_id})")


@app.command()
def sweep(
    recipe: str = typer.Argument(..., help="Recipe name (llm recipes list) or path to a .yaml."),
    vary: List[str] = typer.Option(..., "--vary", help="KEY=V1,V2,... to vary (repeatable; all combinations run)."),
    set_: Optional[List[str]] = SetOption,
    wait: bool = WaitOption,
) -> None:
    """Run RECIPE for every combination of --vary at equal token budget, then compare them."""
    from llm_lifecycle.cli.progress import console_progress
    from llm_lifecycle.workflows.runner.sweep import run_sweep

    result = run_sweep(recipe, vary, set_ or [], _workspace(), console_progress(console), wait)
    console.print(f"sweep run {result.run_id}: {len(result.pipeline_run_ids)} pipelines; "
                  f"report {result.report_dir / 'compare.html'}; compare again with `llm compare {result.run_id}`")


@app.command()
def serve(
    model: str = typer.Option(..., help="A registered version: models:/NAME@ALIAS (e.g. @int4) or models:/NAME/VERSION."),
    port: int = typer.Option(5001, min=1, max=65535, help="Port to serve on."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
) -> None:
    """Serve a registered model with `mlflow models serve` (POST /invocations {"inputs": ["prompt"]})."""
    from llm_lifecycle.workflows.serving.serve import check_registered, serve_command

    check_registered(model)
    argv, env = serve_command(model, host, port)
    console.print(f"serving {model} on http://{host}:{port}/invocations")
    raise typer.Exit(_serve_until_stopped(argv, env))


@app.command()
def plan(
    preset: Optional[str] = typer.Argument(None, help="Model preset to plan for, e.g. llama3-8b, qwen3-30b-a3b "
                                                   "(docs/models.md; an unknown name lists the known ones)."),
    params: Optional[str] = typer.Option(None, "--params", help="Or a LLaMA-shaped model of this size: 7B, 500M."),
    batch_size: int = typer.Option(1, help="Sequences per step (training) or generated at once (inference)."),
    seq_len: int = typer.Option(2048, help="Tokens per sequence."),
    lora_rank: int = typer.Option(16, min=1, help="Rank of the LoRA / QLoRA adapters planned."),
    gpu: Optional[str] = typer.Option(None, help="Size the job in GPUs of this kind: H100, H200, A100, A100-40GB, L4, A10, 4090."),
    gpu_memory: Optional[float] = typer.Option(None, min=1, help="Or GPUs with this much memory (GiB)."),
    tokens: Optional[str] = typer.Option(None, help="Estimate the time to train on this many tokens (e.g. 2T); needs --gpu."),
    mfu: float = typer.Option(0.4, min=0.01, max=1.0, help="Model FLOPs utilisation the time estimate assumes."),
    gpus: Optional[int] = typer.Option(None, min=1, help="GPUs the time estimate uses (default: as many as bf16 training needs)."),
    recompute: bool = typer.Option(False, "--activation-checkpointing", help="Plan training with activation checkpointing."),
) -> None:
    """Estimate training, LoRA/QLoRA and inference memory, GPUs needed, and training time."""
    from llm_lifecycle.workflows.engine.memory import GPU_RESERVED_BYTES, format_bytes, training_days
    from llm_lifecycle.workflows.runner import planning

    if (preset is None) == (params is None):
        raise UserError("llm plan: give a preset name or --params (e.g. `llm plan llama3-8b`, `llm plan --params 7B`)")
    if tokens is not None and gpu is None:
        raise UserError("llm plan --tokens: the time estimate needs the GPU's peak FLOP/s; add --gpu (e.g. --gpu H100)")
    gpu_bytes, peak = planning.gpu_spec(gpu) if gpu else (None, None)
    gpu_bytes = gpu_memory * 2**30 if gpu_memory else gpu_bytes
    if preset is not None:
        from llm_lifecycle.models.config import ModelConfig
        from llm_lifecycle.models.presets import load_preset

        try:
            cfg = ModelConfig.from_dict(load_preset(preset))
        except ValueError as err:
            raise UserError(f"llm plan: {err}") from None
        shape, flops_per_token = planning.shape_of(cfg), cfg.flops_per_token(seq_len)
    else:
        shape = planning.shape_for_params(planning.parse_params(params))
        flops_per_token = planning.dense_flops_per_token(shape, seq_len)
    where, available = planning.available_memory()
    rows = planning.plan_rows(shape, batch_size, seq_len, lora_rank, recompute)
    table = Table(title=f"memory for {preset or params} ({shape.params / 1e9:.2f}B parameters), "
                        f"batch {batch_size} x {seq_len} tokens")
    gpu_name = f"{gpu or 'GPUs'} ({gpu_bytes / 2**30:.0f} GiB)" if gpu_bytes else None
    for col in ("use", "precision", "weights", "optimizer", "grads", "activations / KV cache", "peak", f"fits {where}?",
                *([gpu_name] if gpu_name else [])):
        table.add_column(col)
    counts = planning.gpu_column(rows, gpu_bytes) if gpu_bytes else [None] * len(rows)
    for (use, precision, est), count in zip(rows, counts):
        transient = est.get("activations", 0) + est.get("loss", 0) + est.get("kv_cache", 0) + est.get("working", 0)
        fits = "yes" if est["total"] < available else "[red]no[/red]"
        table.add_row(use, precision, *(format_bytes(est[k]) if k in est else "-" for k in ("weights", "optimizer", "grads")),
                      format_bytes(transient), format_bytes(est["total"]), fits, *([count] if count else []))
    console.print(table)
    console.print(f"Training peak: weights + optimizer + the larger of activations and grads (grads fill "
                  f"as backward frees activations). {where} available here: {format_bytes(available)}")
    if gpu_name:
        console.print(f"GPUs: training sharded with FSDP (each GPU keeps its own batch's activations), inference "
                      f"split by tensor parallelism; {format_bytes(GPU_RESERVED_BYTES)} of each GPU reserved. "
                      "-*: one GPU cannot hold a batch's activations (try --activation-checkpointing, a shorter "
                      "--seq-len, or pipeline/sequence parallelism, which this plan does not model).")
    if tokens is not None:
        n_tokens = planning.parse_params(tokens, "--tokens")
        n_gpus = gpus or planning.gpus_needed(rows[1][2], gpu_bytes)
        if n_gpus is None:
            raise UserError(f"llm plan --tokens: at batch {batch_size} x {seq_len} one {gpu}'s share of the "
                            "activations does not fit; lower --seq-len or --batch-size, or give --gpus")
        days = training_days(flops_per_token, n_tokens, n_gpus, peak, mfu)
        console.print(f"Time: {n_tokens:.3g} tokens x {flops_per_token:.3g} FLOPs/token on {n_gpus} x {gpu} "
                      f"({peak / 1e12:.0f} TFLOP/s bf16 each) at {mfu:.0%} MFU: {days:.1f} days "
                      f"({days * 24 * n_gpus:,.0f} GPU-hours)")


@app.command()
def hw() -> None:
    """The hardware profile recorded with every run (hw.* tags)."""
    from llm_lifecycle.registry.hardware import hardware_profile

    table = Table(title="hardware profile")
    table.add_column("tag")
    table.add_column("value")
    for k, v in hardware_profile().items():
        table.add_row(k, v)
    console.print(table)


def _terminate(signum, frame):
    # Unwind normally, so runs are marked KILLED and temporary files are removed.
    raise SystemExit(128 + signum)


def _quiet_mlflow() -> None:
    # MLflow's INFO chatter (table creation, system-metrics threads) would bury our output:
    # the environment for an MLflow imported later, the logger for one imported already.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])
    # Per-artifact download bars from model registration interleave with our stage bars.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # With a tracking server MLflow prints "View run … at: http://…" as each run ends.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def main() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    app()


if __name__ == "__main__":
    main()
