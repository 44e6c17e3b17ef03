"""Comparing runs: `llm sweep` at smoke size, `llm compare`, and the MLflow UI that `llm ui`
serves, driven by a real headless Chromium: the sweep's runs, and two recipes' pipelines side by
side (their `_headline/...` metrics in the runs table and the compare view, one child run per
stage instance of a graph recipe). Screenshots go to test-artifacts/, also when a check fails."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from conftest import TINY_OVERRIDES, free_port, needs, port_frees
from llm_lifecycle.cli.app import app
from llm_lifecycle.registry.tracking import configure
from llm_lifecycle.workflows.runner.pipeline import run_pipeline
from llm_lifecycle.workflows.runner.recipe import load_recipe
from llm_lifecycle.workflows.runner.stage import SilentProgress
from llm_lifecycle.workflows.runner.summary import PREFIX
from llm_lifecycle.workflows.runner.sweep import run_sweep

RECIPE = "llama-small"
VARY = "model.n_kv_heads=1,4"
VARIANTS = ["model.n_kv_heads=1", "model.n_kv_heads=4"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# A second recipe for the UI to compare with the sweep's: a graph whose instances are named
# apart from their kinds (two extend-context steps), at smoke size.
GRAPH_RECIPE = "deepseek-v3-context"
GRAPH_OVERRIDES = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
    "tokenizer-train.vocab_size=512",
    "pretrain.steps=6", "pretrain.batch_size=2", "pretrain.warmup_steps=2",
    *(f"{step}.{key}" for step in ("extend-32k", "extend-128k")
      for key in ("steps=2", "batch_size=1", "warmup_steps=1", "eval_windows=2", "passkey_trials=1")),
]
# The headline metrics both recipes' pipeline runs carry (both have a stage named pretrain).
SHARED_HEADLINE = f"{PREFIX}pretrain.heldout_ppl"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    ws = tmp_path_factory.mktemp("sweep") / "llm-runs"
    os.environ["LLM_HOME"] = str(ws)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    result = run_sweep(RECIPE, [VARY], list(TINY_OVERRIDES), ws, SilentProgress())
    configure(ws)
    yield ws, result
    os.environ.pop("LLM_HOME", None)


def test_sweep_is_one_parent_over_two_full_pipelines(swept):
    ws, result = swept
    client = MlflowClient()
    sweep_run = client.get_run(result.run_id)
    assert sweep_run.data.tags["llm.stage"] == "sweep"
    exp = sweep_run.info.experiment_id
    pipelines = client.search_runs([exp], f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert sorted(r.data.tags["llm.variant"] for r in pipelines) == VARIANTS
    assert sorted(r.info.run_id for r in pipelines) == sorted(result.pipeline_run_ids)
    for pipeline in pipelines:
        stages = client.search_runs([exp], f"tags.mlflow.parentRunId = '{pipeline.info.run_id}'")
        # The first variant runs the data stages; the second reuses them (same fingerprints).
        ran = {r.info.run_name for r in stages}
        assert {"pretrain", "sft", "rl", "eval", "export"} <= ran
        assert pipeline.data.tags["mlflow.note.content"].startswith("| stage |")
        assert "pretrain.loss" in pipeline.data.metrics or any(k.startswith("pretrain.") for k in pipeline.data.metrics)
    # Each variant registers its own models, so one variant's aliases never overwrite the other's.
    for slug in ("n-kv-heads-1", "n-kv-heads-4"):
        assert client.get_model_version_by_alias(f"{RECIPE}-{slug}", "sft").tags["llm.variant"]
    # Equal token budget: the sweep records it once, for every variant.
    assert int(sweep_run.data.params["tokens.pretrain"]) == 6 * 2 * 64


def test_sweep_report_plots_both_curves(swept):
    ws, result = swept
    report = result.report_dir
    import json

    data = json.loads((report / "compare.json").read_text())
    curves = data["loss_curves"]["pretrain"]
    assert sorted(curves) == VARIANTS
    assert all(len(c["loss"]) == 6 for c in curves.values())
    assert data["differing_params"]["model.n_kv_heads"] == ["1", "4"] or data["differing_params"]["model.n_kv_heads"] == ["4", "1"]
    # Both lines are drawn: the PNG holds pixels of both runs' colours (matplotlib's C0 and C1).
    from matplotlib.image import imread

    pixels = imread(report / "compare.png")[..., :3]
    for hex_colour in ("#1f77b4", "#ff7f0e"):
        rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).max(axis=-1) < 0.02).sum() > 200, hex_colour
    html = (report / "compare.html").read_text()
    assert "model.n_kv_heads" in html and "data:image/png;base64," in html
    artifacts = {f.path for f in MlflowClient().list_artifacts(result.run_id, "report")}
    assert {"report/compare.png", "report/compare.html", "report/compare.json"} <= artifacts


def test_llm_compare_prints_what_differs_and_logs_a_compare_run(swept, tmp_path):
    ws, result = swept
    out = tmp_path / "cmp"
    run = CliRunner().invoke(app, ["compare", *result.pipeline_run_ids, "--out", str(out)], terminal_width=200)
    assert run.exit_code == 0, run.output
    assert "model.n_kv_heads" in run.output and all(v in run.output for v in VARIANTS)
    assert (out / "compare.png").stat().st_size > 10_000
    compare_runs = MlflowClient().search_runs(
        [MlflowClient().get_run(result.run_id).info.experiment_id], "tags.llm.stage = 'compare'"
    )
    assert sorted(compare_runs[0].data.tags["llm.compared"].split(",")) == sorted(result.pipeline_run_ids)


@pytest.mark.parametrize("args, says", [
    (["compare", "no-such-recipe", "another"], "neither a run id nor a recipe"),
    (["sweep", RECIPE, "--vary", "pretrain.steps=2,4"], "token budget"),
    (["sweep", RECIPE, "--vary", "model.n_kv_heads"], "expected KEY=VALUE1,VALUE2"),
])
def test_compare_and_sweep_refuse_bad_input_in_one_line(swept, args, says):
    ws, _ = swept
    out = subprocess.run([sys.executable, "-m", "llm_lifecycle.cli.app", *args], capture_output=True, text=True,
                         env={**os.environ, "LLM_HOME": str(ws)}, timeout=120)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3  # one line, soft-wrapped by rich at most


@pytest.fixture(scope="module")
def graph_pipeline(swept):
    """GRAPH_RECIPE's pipeline in the sweep's workspace: (its run, its stage instances' names)."""
    ws, _ = swept
    recipe = load_recipe(GRAPH_RECIPE, GRAPH_OVERRIDES)
    run_pipeline(recipe, ws, SilentProgress())
    client = MlflowClient()
    exp = client.get_experiment_by_name(GRAPH_RECIPE).experiment_id
    (pipeline,) = client.search_runs([exp], "tags.llm.stage = 'pipeline'")
    return pipeline, sorted(recipe.instances)


@pytest.fixture()
def ui_server(swept):
    ws, _ = swept
    port = free_port()
    env = {**os.environ, "LLM_HOME": str(ws)}
    # Its own process group, so that whatever the test leaves behind can be killed at the end.
    proc = subprocess.Popen([sys.executable, "-m", "llm_lifecycle.cli.app", "ui", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"llm ui exited: {proc.stdout.read()}")
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("llm ui did not answer /health within 180 s")
    yield url
    # SIGTERM to `llm ui` alone, as a service manager or `kill` sends it: the server and its
    # workers must stop with it and free the port.
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
        freed = port_frees(port, timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert freed, f"port {port} still served after SIGTERM to llm ui"



@pytest.fixture()
def chromium() -> str:
    """Debian's Chromium, checked before `llm ui` is started for it."""
    needs(CHROMIUM is not None, "Debian's chromium", "apt-get install chromium")
    return CHROMIUM


EXPAND = "button[data-component-id$='runnamecellrenderer.tsx_46']"  # the +/- beside a parent run


@contextmanager
def _browser_page(chromium: str, width: int, height: int):
    """A Chromium page of the given size, patient with MLflow's UI (90 s per step); its
    screenshots go to test-artifacts/."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": height})
        page.set_default_timeout(90_000)
        yield page
        browser.close()


def test_mlflow_ui_shows_the_sweep_and_compares_two_stage_runs(chromium, swept, ui_server):
    with _browser_page(chromium, width=1600, height=1000) as page:
        page.goto(f"{ui_server}/#/experiments?workflowType=machine_learning", wait_until="load")
        href = page.get_by_role("link", name=RECIPE, exact=True).get_attribute("href")
        assert re.fullmatch(r"#/experiments/\d+", href)
        page.goto(f"{ui_server}/{href}/runs?workflowType=machine_learning", wait_until="load")
        page.get_by_role("link", name=re.compile(r"^sweep \[")).wait_for()
        page.locator(EXPAND).first.click()  # the sweep: its two pipelines appear
        page.get_by_role("link", name=re.compile(r"^pipeline \[")).first.wait_for()
        for i in range(1, page.locator(EXPAND).count()):
            page.locator(EXPAND).nth(i).click()  # each pipeline: its stage runs appear
        page.get_by_role("link", name="pretrain", exact=True).first.wait_for()
        names = page.locator("[role=gridcell][col-id='attributes.`Run Name`'] a").all_inner_texts()
        assert sorted(n for n in names if n.startswith("pipeline [")) == [f"pipeline [{v}]" for v in VARIANTS]
        assert names.count("pretrain") == 2 and names.count("sft") == 2
        page.screenshot(path=str(ARTIFACTS / "mlflow-runs.png"))

        rows = page.locator("[role=row]", has=page.get_by_role("link", name="pretrain", exact=True))
        for i in range(2):
            rows.nth(i).locator("input.ag-checkbox-input").check()
        page.get_by_role("button", name="Compare", exact=True).click()
        page.wait_for_url(re.compile(r"compare-runs"))
        page.get_by_text("Comparing 2 Runs").wait_for()
        page.get_by_text("model.n_kv_heads").first.wait_for()
        page.screenshot(path=str(ARTIFACTS / "mlflow-compare.png"), full_page=True)
    assert (ARTIFACTS / "mlflow-compare.png").stat().st_size > 20_000


@contextmanager
def _screenshot_on_failure(page, name: str):
    """Keep what the browser showed when a check fails: test-artifacts/NAME."""
    try:
        yield
    except BaseException:
        page.screenshot(path=str(ARTIFACTS / name), full_page=True)
        raise


def _metric_cell(page, run_name_link, metric: str) -> str:
    """The runs table's cell of `metric` in the row of `run_name_link`. AG Grid draws a row's
    pinned columns (checkbox, run name) and its scrolling columns (metrics) as two row
    elements that share a row-id."""
    row_id = page.locator("[role=row]", has=run_name_link).first.get_attribute("row-id")
    return page.locator(f"[role=row][row-id='{row_id}'] [role=gridcell][col-id='metrics.`{metric}`']").inner_text()


def _compare_view_values(page, metric: str) -> list[str]:
    """The values the compare-runs page shows for `metric`, one per run, left to right. Names
    and values are two virtualised grids whose rows line up by their CSS `top`."""
    name = page.get_by_role("link", name=metric, exact=True)
    name.scroll_into_view_if_needed()
    return name.evaluate("""a => {
        const top = a.parentElement.style.top;
        const cells = el => el.querySelectorAll(`div[style*="top: ${top};"] > span[tooltip-data-state]`);
        let el = a.parentElement;
        while (el && cells(el).length === 0) el = el.parentElement;
        return [...cells(el)].sort((x, y) => x.parentElement.offsetLeft - y.parentElement.offsetLeft)
                             .map(s => s.textContent.trim());
    }""")


def test_mlflow_ui_compares_two_recipes_pipelines_by_their_headline_metrics(chromium, swept, graph_pipeline,
                                                                            ui_server):
    graph_run, instances = graph_pipeline
    assert set(instances) > {"extend-32k", "extend-128k"}  # two instances of one kind, named apart
    client = MlflowClient()
    sweep_exp = client.get_experiment_by_name(RECIPE).experiment_id
    sweep_pipelines = client.search_runs([sweep_exp], "tags.llm.stage = 'pipeline'")
    want = {run.info.run_name: run.data.metrics[SHARED_HEADLINE] for run in [*sweep_pipelines, graph_run]}
    assert len(want) == 3 and len({f"{v:.4g}" for v in want.values()}) == 3  # three pipelines, told apart
    with _browser_page(chromium, width=2200, height=1100) as page:
        with _screenshot_on_failure(page, "mlflow-two-recipes-failed.png"):
            # The graph recipe's pipeline run: one child run per stage instance, named after it.
            page.goto(f"{ui_server}/#/experiments/{graph_run.info.experiment_id}/runs?workflowType=machine_learning",
                      wait_until="load")
            page.get_by_role("link", name="pipeline", exact=True).wait_for()
            page.locator(EXPAND).first.click()
            page.get_by_role("link", name="extend-128k", exact=True).wait_for()
            names = page.locator("[role=gridcell][col-id='attributes.`Run Name`'] a").all_inner_texts()
            assert sorted(names) == sorted(["pipeline", *instances])
            page.screenshot(path=str(ARTIFACTS / "mlflow-graph-children.png"))

            # Both recipes' experiments in one runs table, the headline metric as a column.
            page.goto(f"{ui_server}/#/experiments?workflowType=machine_learning", wait_until="load")
            for recipe in (RECIPE, GRAPH_RECIPE):
                page.get_by_role("row", name=re.compile(re.escape(recipe))).get_by_role("checkbox").check()
            page.get_by_role("button", name="Compare", exact=True).click()
            page.wait_for_url(re.compile(r"compare-experiments"))
            sweep = page.get_by_role("link", name=re.compile(r"^sweep \["))
            page.locator("[role=row]", has=sweep).locator(EXPAND).click()  # the sweep's two pipelines
            page.get_by_role("link", name=re.compile(r"^pipeline \[")).first.wait_for()
            assistant = page.get_by_role("button", name="Close", exact=True)  # MLflow 3's assistant panel
            if assistant.count():
                assistant.click()  # room for the metric columns
            page.get_by_role("button", name="Columns", exact=True).click()
            page.get_by_placeholder("Search columns").fill(PREFIX)
            page.get_by_text(SHARED_HEADLINE, exact=True).click()
            page.keyboard.press("Escape")
            shown = {name: _metric_cell(page, page.get_by_role("link", name=name, exact=True), SHARED_HEADLINE)
                     for name in want}
            assert {name: float(text) for name, text in shown.items()} == pytest.approx(want, rel=1e-4), shown
            page.screenshot(path=str(ARTIFACTS / "mlflow-two-recipes.png"))

            # The compare view: a pipeline of each recipe, their headline metrics side by side.
            pair = [sweep_pipelines[0].info.run_name, "pipeline"]
            for name in pair:
                row = page.locator("[role=row]", has=page.get_by_role("link", name=name, exact=True)).first
                row.locator("input.ag-checkbox-input").check()
            page.get_by_role("button", name="Compare", exact=True).click()
            page.wait_for_url(re.compile(r"compare-runs"))
            page.get_by_text("Comparing 2 Runs").wait_for()
            values = _compare_view_values(page, SHARED_HEADLINE)
            assert sorted(float(v) for v in values) == pytest.approx(sorted(want[n] for n in pair), rel=1e-3), values
            page.screenshot(path=str(ARTIFACTS / "mlflow-compare-recipes.png"))
    assert (ARTIFACTS / "mlflow-compare-recipes.png").stat().st_size > 20_000
