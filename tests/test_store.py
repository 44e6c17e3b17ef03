"""The workspace's MLflow store: a new one is a copy of an empty, migrated store made once per
MLflow version (issue 21, item 3: MLflow's schema migrations were most of an empty
workspace's start-up), and the store followed is the workspace's, not an earlier one's."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import mlflow
import pytest

from llm_lifecycle.registry import tracking


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return folder / "llm-lifecycle"


@pytest.fixture()
def no_uri(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def log_a_run(ws: Path) -> str:
    tracking.configure(ws)
    experiment = tracking.ensure_experiment("store-check", ws)
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_metric("loss", 1.5)
    return run.info.run_id


def test_new_workspaces_copy_one_migrated_store(cache, tmp_path):
    first, second = tmp_path / "ws1", tmp_path / "ws2"
    run_id = log_a_run(first)
    (template,) = cache.glob("mlflow-*-empty.db")
    made = template.stat().st_mtime_ns
    log_a_run(second)
    assert template.stat().st_mtime_ns == made  # made once, copied twice
    head = rows(template, "SELECT version_num FROM alembic_version")
    for ws in (first, second):
        store = ws / "mlflow.db"
        assert rows(store, "SELECT version_num FROM alembic_version") == head
        assert rows(store, "SELECT artifact_location FROM experiments WHERE experiment_id = 0") == [
            ((ws / "mlartifacts" / "Default").as_uri(),)]
    assert rows(first / "mlflow.db", "SELECT count(*) FROM runs") == [(1,)]
    assert rows(second / "mlflow.db", f"SELECT count(*) FROM runs WHERE run_uuid = '{run_id}'") == [(0,)]
    assert rows(template, "SELECT count(*) FROM runs") == [(0,)]


def test_without_a_writable_cache_mlflow_makes_the_store(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log_a_run(tmp_path / "ws")
    assert rows(tmp_path / "ws" / "mlflow.db", "SELECT count(*) FROM runs") == [(1,)]


def test_a_later_workspace_is_not_steered_by_the_earlier_ones_exported_uri(no_uri, tmp_path):
    tracking.configure(tmp_path / "ws1")
    assert "ws1" in mlflow.environment_variables.MLFLOW_TRACKING_URI.get()  # exported by mlflow.set_tracking_uri
    assert tracking.configure(tmp_path / "ws2") == f"sqlite:///{tmp_path / 'ws2' / 'mlflow.db'}"
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'ws2' / 'mlflow.db'}"


def test_a_users_tracking_uri_is_followed(tmp_path, monkeypatch):
    chosen = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", chosen)
    assert tracking.configure(tmp_path / "ws") == chosen
    assert tracking.configure(tmp_path / "ws") == chosen
    assert not (tmp_path / "ws" / "mlflow.db").exists()
