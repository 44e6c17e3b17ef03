"""Evaluate: lm-eval suites (MMLU, GSM8K, C-Eval, CMMLU) through our adapter or lm-eval's own
`hf`/`vllm` backends on an exported checkpoint, plus held-out perplexity (`ppl`) and long-context
probes (`long`). Scores are logged as `eval.<task>.<metric>`; lm-eval's results JSON and a
per-subject table per suite as artifacts; the run and the model version it scored are linked."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from llm_lifecycle.workflows.runner.settings import AT_LEAST_1, NON_EMPTY_STRINGS, NON_NEGATIVE, ConfigError, Settings, setting
from llm_lifecycle.workflows.runner.stage import Port, StageContext, StageKind, StageResult, UserError

OWN_SUITES = ("ppl", "long")  # scored on our model object, not through lm-eval
BACKENDS = ("ours", "hf", "vllm")


@dataclass
class EvalOutcome:
    metrics: dict[str, float]
    rows: list[dict] = field(default_factory=list)  # headline rows (suites and their groups) for the terminal
    run_id: str | None = None
    model_version_uri: str | None = None


def all_suites() -> tuple[str, ...]:
    from llm_lifecycle.evals.harness import SUITES

    return (*SUITES, *OWN_SUITES)


def check_suites(suites: list[str], backend: str) -> None:
    unknown = [s for s in suites if s not in all_suites()]
    if unknown:
        raise UserError(f"unknown eval suite {', '.join(unknown)}; choose from {', '.join(all_suites())}")
    if backend not in BACKENDS:
        raise UserError(f"unknown --backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend != "ours" and set(suites) & set(OWN_SUITES):
        raise UserError(f"suites {', '.join(OWN_SUITES)} run on our own model; use --backend ours for them")


def make_lm(backend: str, model_dir: Path, model, tokenizer, *, batch_size: int, max_gen_toks: int, work_dir: Path,
            progress=None, thinking: str = "", thinking_budget: int = 0):
    """The lm-eval LM for `backend`: our adapter (showing its progress on `progress`), or
    lm-eval's hf/vllm backend on an exported folder."""
    if backend == "ours":
        from llm_lifecycle.evals.harness import LifecycleLM
        from llm_lifecycle.models.checkpoint import read_config

        try:
            return LifecycleLM(model, tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks, progress=progress,
                               thinking=thinking, thinking_budget=thinking_budget,
                               system_prompt=read_config(model_dir).get("system_prompt"))
        except ValueError as err:
            raise UserError(f"eval: {err}") from None
    if thinking or thinking_budget:
        raise UserError(f"thinking modes and budgets run on our adapter only; use --backend ours, not {backend}")
    import torch

    if backend == "vllm" and not torch.cuda.is_available():
        raise UserError("--backend vllm needs a CUDA GPU and none is visible here; use --backend ours or hf on CPU")
    from llm_lifecycle.models.hf import export_hf

    try:
        hf_dir = export_hf(model_dir, work_dir / "hf")
    except ValueError as err:
        raise UserError(f"--backend {backend} needs a Hugging Face export of the model: {err}") from None
    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return HFLM(pretrained=str(hf_dir), device=device, dtype="float32", batch_size=batch_size)
    try:
        from lm_eval.models.vllm_causallms import VLLM
    except ImportError as err:
        raise UserError(f"--backend vllm: vLLM is not installed ({err}); pip install vllm") from None
    return VLLM(pretrained=str(hf_dir), batch_size=batch_size)


def load_suites(suites: list[str], data_dir, num_fewshot: int | None = None) -> dict:
    """Each suite's data, found before any run is opened: lm-eval suites -> their loaded tasks,
    ppl/long -> None (their held-out text is checked). Missing data is a UserError naming it.
    data_dir "hub" (or None) lets lm-eval read the hub."""
    from llm_lifecycle.evals.harness import EvalError, load_suite
    from llm_lifecycle.evals.long_context import heldout_text

    loaded = {}
    for suite in suites:
        try:
            if suite in OWN_SUITES:
                heldout_text(data_dir)
                loaded[suite] = None
            else:
                loaded[suite] = load_suite(suite, None if data_dir == "hub" else data_dir, num_fewshot)
        except EvalError as err:
            raise UserError(str(err)) from None
    return loaded


def run_suites(lm, model, tokenizer, tracker, loaded: dict, *, data_dir, limit, num_fewshot, seed=0,
               apply_chat_template=False, batch_size=8) -> EvalOutcome:
    """Every suite `load_suites` loaded, logged to `tracker`."""
    from llm_lifecycle.evals.harness import EvalError, evaluate_suite, score_rows
    from llm_lifecycle.evals.long_context import long_suite, perplexity_suite

    outcome = EvalOutcome(metrics={})
    for suite, tasks in loaded.items():
        try:
            if suite == "ppl":
                metrics = perplexity_suite(model, tokenizer, data_dir, seq_len=model.cfg.max_seq_len, max_windows=limit)
                outcome.rows.append({"task": "ppl", "group": True, "n": int(metrics["eval.ppl.tokens"]),
                                     "ppl": metrics["eval.ppl.ppl"]})
            elif suite == "long":
                metrics = long_suite(model, tokenizer, data_dir, max_len=model.cfg.max_seq_len, trials=limit or 4,
                                     seed=seed, batch_size=batch_size)
                outcome.rows.append({"task": "long", "group": True, "n": None,
                                     **{k.split(".", 2)[2]: v for k, v in metrics.items()}})
            else:
                report = evaluate_suite(lm, tasks, limit=limit, num_fewshot=num_fewshot, seed=seed,
                                        apply_chat_template=apply_chat_template)
                metrics = report.metrics
                rows = score_rows(report)
                outcome.rows += [r for r in rows if r["group"]] or rows[:1]
                tracker.log_dict(report.results, f"eval/{suite}/results.json")
                tracker.log_text(_markdown(rows), f"eval/{suite}/subjects.md")
                tracker.set_tags({f"eval.{suite}.data": report.data.get("source", ""),
                                  f"eval.{suite}.splits": str(report.data.get("splits", "")),
                                  f"eval.{suite}.num_fewshot": str(report.num_fewshot),
                                  f"eval.{suite}.versions": str(report.versions)[:4000]})
        except EvalError as err:
            raise UserError(str(err)) from None
        outcome.metrics.update(metrics)
        tracker.log_metrics(metrics)
    return outcome


def _markdown(rows: list[dict]) -> str:
    """The per-subject table: one line per task (groups first), a column per metric."""
    metrics = sorted({k for r in rows for k in r} - {"task", "group", "n"})
    lines = ["| task | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for r in rows:
        cells = [f"{r[m]:.4f}" if m in r else "" for m in metrics]
        lines.append(f"| {'**' + r['task'] + '**' if r['group'] else r['task']} | {r['n'] or ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def headline(metrics: dict[str, float], suites: list[str]) -> dict[str, float]:
    """The suite-level scores (no per-subject ones, no stderrs): what a model version is tagged with."""
    from llm_lifecycle.evals.harness import SUITES

    tasks = {t for s in suites for t in SUITES.get(s, [s])}
    return {k: v for k, v in metrics.items() if k.split(".")[1] in tasks and "_stderr" not in k}


@dataclass
class EvalSettings(Settings):
    suites: list[str] = setting(["mmlu", "gsm8k", "ceval"], "lm-eval suites (mmlu, gsm8k, ceval, cmmlu) and our own "
                                "(ppl, long); a suite whose data cannot be had is not run, and said so",
                                limit=NON_EMPTY_STRINGS)
    data_dir: str = setting("builtin", "builtin: the small offline mirror shipped; hub: Hugging Face; or a folder "
                                       "in the official layouts (a suite it lacks comes from the mirror or the hub)")
    limit: int = setting(20, "questions per task", limit=AT_LEAST_1)
    num_fewshot: int | None = setting(None, "few-shot examples (empty: the suite's default)")
    batch_size: int = setting(8, "sequences per forward pass", limit=AT_LEAST_1)
    max_gen_toks: int = setting(64, "tokens generated per answer (GSM8K)", limit=AT_LEAST_1)
    thinking_budget: int = setting(0, "at most this many thinking tokens per answer, then </think> is forced "
                                      "(Qwen3); 0: no limit", limit=NON_NEGATIVE)

    def check(self, where: str, upstream: dict) -> None:
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"{where}.num_fewshot: expected empty (the suite's default) or an integer >= 0, "
                              f"got {self.num_fewshot}")
        if self.data_dir not in ("builtin", "hub"):
            from llm_lifecycle.evals.local_data import resolve_data_dir

            if not resolve_data_dir(self.data_dir).is_dir():
                raise ConfigError(f"{where}.data_dir: {self.data_dir} is not a folder; give a folder holding the "
                                  "benchmarks in their official layouts, 'builtin' (the shipped mirror) or 'hub'")

    def check_inputs(self, where: str, inputs: dict) -> None:
        from llm_lifecycle.workflows.engine.model_stage import check_thinking_budget

        check_thinking_budget(inputs["model"].outputs["model"], self.thinking_budget, f"{where}.thinking_budget")


def suite_data_dir(suite: str, data_dir: str) -> str | None:
    """Where the pipeline's eval reads `suite`: `data_dir` when it holds the suite, else the
    shipped mirror when it does, else the hub when it answers; None when no data can be had
    (the suite is then not run, and the stage says so)."""
    from llm_lifecycle.evals.local_data import BUILTIN_DATA_DIR, resolve_data_dir

    if suite in OWN_SUITES:
        return data_dir
    if data_dir not in ("builtin", "hub") and (resolve_data_dir(data_dir) / suite).is_dir():
        return data_dir
    if data_dir != "hub" and (BUILTIN_DATA_DIR / suite).is_dir():
        return "builtin"
    return "hub" if hub_has(suite) else None


@functools.cache
def hub_has(suite: str) -> bool:
    """Whether the Hugging Face hub answers for the suite's dataset (False offline, at once)."""
    from huggingface_hub import HfApi, is_offline_mode

    from llm_lifecycle.evals.local_data import BENCHMARKS

    if is_offline_mode():
        return False
    try:
        HfApi().dataset_info(BENCHMARKS[suite].hub_dataset, timeout=10)
    except Exception:  # no network, DNS, proxy, an HTTP error: all mean "not from the hub, now"
        return False
    return True


def not_run_note(suite: str) -> str:
    from llm_lifecycle.evals.local_data import BENCHMARKS

    bench = BENCHMARKS[suite]
    return (f"not run (no data); how to get it: put {bench.layout} under a folder DIR and run with "
            f"--data-dir DIR (or --set eval.data_dir=DIR), or run online so lm-eval reads {bench.hub_dataset} "
            "from the Hugging Face hub")


def run(ctx: StageContext, cfg: EvalSettings) -> StageResult:
    from llm_lifecycle.registry import tracking
    from llm_lifecycle.workflows.engine.model_stage import heldout_perplexity, load_input_model

    model, tokenizer, model_dir = load_input_model(ctx)
    lm = make_lm("ours", model_dir, model, tokenizer, batch_size=cfg.batch_size, max_gen_toks=cfg.max_gen_toks,
                 work_dir=ctx.stage_dir, progress=ctx.progress, thinking_budget=cfg.thinking_budget)
    data_dirs = {suite: suite_data_dir(suite, cfg.data_dir) for suite in cfg.suites}
    notes = {suite: not_run_note(suite) for suite, where in data_dirs.items() if where is None}
    if notes:
        ctx.tracker.set_tags({f"eval.{suite}.status": note for suite, note in notes.items()})
    loaded = {}
    for suite, where in data_dirs.items():
        if where is not None:
            loaded |= load_suites([suite], where, cfg.num_fewshot)
    outcome = run_suites(lm, model, tokenizer, ctx.tracker, loaded, data_dir=cfg.data_dir,
                         limit=cfg.limit, num_fewshot=cfg.num_fewshot, seed=ctx.seed, batch_size=cfg.batch_size)
    metrics = outcome.metrics
    metrics["eval.heldout.ppl"] = heldout_perplexity(ctx, model, ctx.values["base_seq_len"], 16)
    source = ctx.inputs["model"]
    if source.model_version and source.model_dir == source.outputs["model"] and isinstance(ctx.tracker, tracking.MlflowTracker):
        tracking.link_eval_run(ctx.tracker, *source.model_version, headline(metrics, cfg.suites))
    return StageResult(metrics=metrics, notes=notes)


KIND = StageKind("eval", EvalSettings, run, inputs=(Port("model", "model"), Port("shards", "shards")))


def evaluate_model(ref: str, suites: list[str], *, data_dir, limit, num_fewshot, batch_size, max_gen_toks=256,
                   backend: str = "ours", seed: int = 0, apply_chat_template: bool = False,
                   progress=None, thinking: str = "", thinking_budget: int = 0) -> EvalOutcome:
    """`llm eval --model REF`: a standalone, tracked evaluation of any model reference."""
    import tempfile

    from llm_lifecycle.models.load import load_model
    from llm_lifecycle.registry import tracking
    from llm_lifecycle.workflows.engine.model_stage import check_thinking_budget
    from llm_lifecycle.workflows.refs import resolve_model_dir

    check_suites(suites, backend)
    model_dir = resolve_model_dir(ref)
    check_thinking_budget(model_dir, thinking_budget, "llm eval --thinking-budget")
    model, tokenizer = load_model(model_dir)
    if tokenizer is None:
        raise UserError(f"{ref}: no tokenizer.json beside the weights; evaluation needs the model's tokenizer")
    version = tracking.registered_version(ref)
    experiment = version[0] if version else "eval"
    tracking.configure()
    with tempfile.TemporaryDirectory(prefix="llm-eval-") as work_dir:
        lm = make_lm(backend, model_dir, model, tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks,
                     work_dir=Path(work_dir), progress=progress, thinking=thinking, thinking_budget=thinking_budget)
        loaded = load_suites(suites, data_dir, num_fewshot)  # missing data stops here, before a run is opened
        with tracking.start_run(experiment, "eval", {"llm.stage": "eval", "llm.model_ref": ref,
                                                     "llm.eval_backend": backend}) as tracker:
            tracker.log_params({"model": ref, "suites": suites, "data_dir": data_dir, "limit": limit,
                                "num_fewshot": num_fewshot, "batch_size": batch_size, "backend": backend,
                                "seed": seed, "apply_chat_template": apply_chat_template, "thinking": thinking,
                                "thinking_budget": thinking_budget})
            outcome = run_suites(lm, model, tokenizer, tracker, loaded, data_dir=data_dir, limit=limit,
                                 num_fewshot=num_fewshot, seed=seed, apply_chat_template=apply_chat_template,
                                 batch_size=batch_size)
            if version:
                tracking.link_eval_run(tracker, *version, headline(outcome.metrics, suites))
                outcome.model_version_uri = f"models:/{version[0]}/{version[1]}"
            outcome.run_id = tracker.run_id
    return outcome
