"""What `llm pipeline` shows: the summary of what each stage did, plain progress lines where
no one watches a terminal, and third-party output kept off the console."""

from __future__ import annotations

import io
import logging
import sys
import warnings

from rich.console import Console

from llm_lifecycle.cli.progress import PlainProgress, RichProgress, console_progress
from llm_lifecycle.workflows.runner.library_output import FILE_NAME, library_output_to
from llm_lifecycle.workflows.runner.stage import StageResult
from llm_lifecycle.workflows.runner.summary import headline_metrics, summary_lines

RESULTS = {
    "pretrain": StageResult(metrics={"heldout_ppl_before": 4100.0, "heldout_ppl": 210.0, "tokens_per_s": 5300.0,
                                     "final_loss": 5.3}),
    "extend-context": StageResult(metrics={"seq_len": 512, "ppl_before_512": 260.0, "ppl_after_512": 190.0,
                                           "ppl_before_256": 210.0, "ppl_after_256": 205.0}),
    "sft": StageResult(metrics={"heldout_loss_before": 6.1, "heldout_loss": 4.2}),
    "rl": StageResult(metrics={"heldout_before.reward_accuracy": 0.0, "heldout_after.reward_accuracy": 0.61,
                               "heldout_before.reward_margin": 0.0, "heldout_after.reward_margin": 0.08,
                               "heldout_before.dpo_loss": 0.6931, "heldout_after.dpo_loss": 0.70}),
    "eval": StageResult(
        metrics={"eval.mmlu.acc": 0.25, "eval.mmlu.acc_stderr": 0.02, "eval.mmlu_abstract_algebra.acc": 0.5,
                 "eval.mmlu_abstract_algebra.acc_stderr": 0.5,
                 "eval.gsm8k.exact_match_strict-match": 0.0, "eval.gsm8k.exact_match_stderr_strict-match": 0.0,
                 "eval.gsm8k.exact_match_flexible-extract": 0.05,
                 "eval.gsm8k.exact_match_stderr_flexible-extract": 0.03},
        notes={"ceval": "not run (no data); how to get it: ..."}),
    "quantize": StageResult(metrics={"ppl_before": 190.0, "ppl_after": 190.5, "ppl_change_pct": 0.26,
                                     "size_mb_before": 30.0, "size_mb_after": 8.1}),
}


def test_headline_metrics_name_each_stage_s_own_held_out_metric_under_one_prefix():
    assert headline_metrics(RESULTS) == {
        "_headline/pretrain.heldout_ppl": 210.0,
        "_headline/pretrain.heldout_ppl_before": 4100.0,
        "_headline/pretrain.tokens_per_s": 5300.0,
        "_headline/extend-context.long_ppl": 190.0,
        "_headline/extend-context.long_ppl_before": 260.0,
        "_headline/sft.heldout_loss": 4.2,
        "_headline/sft.heldout_loss_before": 6.1,
        "_headline/rl.pref_accuracy": 0.61,
        "_headline/rl.pref_accuracy_before": 0.0,
        "_headline/rl.reward_margin": 0.08,
        "_headline/rl.reward_margin_before": 0.0,
        "_headline/rl.dpo_loss": 0.70,
        "_headline/rl.dpo_loss_before": 0.6931,
        "_headline/eval.mmlu.acc": 0.25,
        "_headline/eval.gsm8k.exact_match": 0.0,
        "_headline/quantize.ppl_change_pct": 0.26,
        "_headline/quantize.size_mb": 8.1,
    }
    # A stage instance of another name is found by its kind (recipes as stage graphs).
    renamed = headline_metrics({"pretrain-long": RESULTS["pretrain"]}, kinds={"pretrain-long": "pretrain"})
    assert renamed["_headline/pretrain-long.heldout_ppl"] == 210.0


def test_summary_has_one_line_per_suite_and_says_which_way_each_stage_moved():
    lines = dict(summary_lines(RESULTS))
    assert lines["eval: mmlu"] == "acc 0.2500 ± 0.0200"
    assert lines["eval: gsm8k"] == "exact match (strict) 0.0000 ± 0.0000, exact match (flexible) 0.0500 ± 0.0300"
    assert not any("abstract_algebra" in stage or "abstract_algebra" in text for stage, text in lines.items())
    assert lines["eval: ceval"].startswith("not run (no data); how to get it")
    assert lines["pretrain"] == "held-out ppl 4100 -> 210 (better); 5,300 tokens/s"
    assert lines["extend-context"] == "held-out ppl at 512 260 -> 190 (better)"
    assert "held-out DPO loss 0.6931 -> 0.7 (WORSE)" in lines["rl"]
    assert "+0.26%, small" in lines["quantize"]
    assert len([stage for stage, _ in summary_lines(RESULTS) if stage.startswith("eval: gsm8k")]) == 1


def test_plain_progress_prints_step_loss_speed_and_eta_without_colour_codes():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=60)
    assert isinstance(console_progress(console), PlainProgress)
    assert isinstance(console_progress(Console(file=io.StringIO(), force_terminal=True)), RichProgress)
    progress = PlainProgress(console, every_s=0.0)
    with progress.task("pretrain", total=300) as bar:
        bar.advance(1)
        bar.update(info="loss 5.123, 3,400 tokens/s")
        bar.advance(1)
    progress.log("[bold]a long message that would be wrapped at sixty columns by rich were it not soft[/bold]")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("  pretrain: 1/300, ETA ")
    assert lines[1].startswith("  pretrain: 2/300, loss 5.123, 3,400 tokens/s, ETA ")
    assert lines[2].startswith("  pretrain: 2/300, loss 5.123, 3,400 tokens/s, took ")
    assert lines[3].endswith("were it not soft")
    assert "\x1b[" not in out.getvalue()


def test_third_party_output_goes_to_the_stage_folder_and_the_console_says_where(tmp_path, capsys):
    logger = logging.getLogger("some_library")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    said = []

    class Said:
        def log(self, message):
            said.append(message)

    try:
        with library_output_to(tmp_path / "stage", Said()):
            logger.warning("library warning")
            warnings.warn("a python warning", UserWarning, stacklevel=1)
            print("Registered model 'x' already exists", file=sys.stderr)
            logging.getLogger("late_library").addHandler(logging.StreamHandler())  # made mid-stage
        logger.warning("after the stage")
    finally:
        logger.removeHandler(handler)
    text = (tmp_path / "stage" / FILE_NAME).read_text()
    assert "library warning" in text and "a python warning" in text and "already exists" in text
    err = capsys.readouterr().err
    assert "library warning" not in err and "already exists" not in err
    assert "after the stage" in err  # handlers are given back
    assert logging.getLogger("late_library").handlers[0].stream is sys.stderr
    assert said == [f"  [dim]library messages: {tmp_path / 'stage' / FILE_NAME}[/dim]"]


def test_a_quiet_stage_leaves_no_log_file(tmp_path):
    with library_output_to(tmp_path, PlainProgress(Console(file=io.StringIO()))):
        pass
    assert not (tmp_path / FILE_NAME).exists()


def test_a_real_pipeline_log_holds_our_lines_only(tmp_path):
    """`llm pipeline R > log.txt 2>&1` as a user runs it, at smoke size: no third-party warning,
    no tqdm bar, no colour code; plain progress lines for pretrain; the summary at the end."""
    import os
    import re
    import subprocess

    from conftest import TINY_OVERRIDES

    log = tmp_path / "log.txt"
    env = {**os.environ, "LLM_HOME": str(tmp_path / "llm-runs")}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "llm_lifecycle.cli.app", "pipeline", "qwen3-moe-small",
                               *(f"--set={o}" for o in TINY_OVERRIDES)],
                              stdout=out, stderr=subprocess.STDOUT, env=env, timeout=1200)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\x1b" not in text
    third_party = re.compile(r"Warning|warnings\.warn|it/s\]|\d+%\|| INFO | WARNING |Registered model|Created version")
    assert not [line for line in text.splitlines() if third_party.search(line)], text
    lines = text.splitlines()
    assert any(re.match(r"  pretrain: \d+/6, loss \d", line) for line in lines), text
    assert lines[-1].startswith("Tracking store:") and "qwen3-moe-small: summary" in text
    assert any(line.split()[:3] == ["pretrain", "held-out", "ppl"] for line in lines), text
