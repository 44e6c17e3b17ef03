"""Evaluate: lm-eval suites (MMLU, GSM8K, C-Eval) through our LM adapter, plus held-out
perplexity. Scores are logged as `eval.<task>.<metric>`; lm-eval's results as artifacts."""

from __future__ import annotations

from llm_lifecycle.workflows.stage import StageContext, StageResult, UserError


def run_suites(model, tokenizer, tracker, suites, *, data_dir, limit, num_fewshot, batch_size, max_gen_toks, seed=0):
    from llm_lifecycle.evals.harness import EvalError, LifecycleLM, evaluate_suite

    lm = LifecycleLM(model, tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks)
    metrics: dict[str, float] = {}
    for suite in suites:
        try:
            report = evaluate_suite(lm, suite, data_dir=None if data_dir == "hub" else data_dir,
                                    limit=limit, num_fewshot=num_fewshot, seed=seed)
        except EvalError as err:
            raise UserError(str(err)) from None
        metrics.update(report.metrics)
        tracker.log_dict(report.to_dict(), f"eval/{suite}.json")
        tracker.set_tags({f"eval.{suite}.data": report.data.get("source", ""),
                          f"eval.{suite}.splits": str(report.data.get("splits", "")),
                          f"eval.{suite}.versions": str(report.versions)[:4000]})
    tracker.log_metrics(metrics)
    return metrics


def run(ctx: StageContext, cfg: dict) -> StageResult:
    from llm_lifecycle.workflows.model_stage import heldout_perplexity, load_upstream_model

    model, tokenizer, _ = load_upstream_model(ctx, "rl")
    metrics = run_suites(model, tokenizer, ctx.tracker, cfg["suites"], data_dir=cfg["data_dir"], limit=cfg["limit"],
                         num_fewshot=cfg["num_fewshot"], batch_size=cfg["batch_size"],
                         max_gen_toks=cfg["max_gen_toks"], seed=ctx.seed)
    metrics["eval.heldout.ppl"] = heldout_perplexity(ctx, model, ctx.recipe.stages["pretrain"]["seq_len"], 16)
    return StageResult(metrics=metrics)


def evaluate_model(ref: str, suites: list[str], *, data_dir, limit, num_fewshot, batch_size, max_gen_toks=256):
    """`llm eval --model REF`: a standalone, tracked evaluation of any model reference."""
    from llm_lifecycle.models.load import load_model
    from llm_lifecycle.registry import tracking
    from llm_lifecycle.workflows.model_ref import resolve_model_dir

    model_dir = resolve_model_dir(ref)
    model, tokenizer = load_model(model_dir)
    experiment = ref.split("/")[1].split("@")[0] if ref.startswith("models:/") else "eval"
    tracking.configure()
    with tracking.start_run(experiment, "eval", {"llm.stage": "eval", "llm.model_ref": ref}) as tracker:
        tracker.log_params({"model": ref, "suites": suites, "data_dir": data_dir, "limit": limit,
                            "num_fewshot": num_fewshot, "batch_size": batch_size})
        return run_suites(model, tokenizer, tracker, suites, data_dir=data_dir, limit=limit,
                          num_fewshot=num_fewshot, batch_size=batch_size, max_gen_toks=max_gen_toks)
