"""Read-side views of the tracking store for `llm models list` and `llm runs list`."""

from __future__ import annotations

import datetime as dt
import re

from llm_lifecycle.registry.tracking import configure, mark_orphaned_runs, tracking_uri


def _when(ms: int | None) -> str:
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M") if ms else ""


def registered_versions() -> list[dict]:
    from mlflow.tracking import MlflowClient

    configure()
    client = MlflowClient()
    rows = []
    for model in client.search_registered_models():
        # The registered model carries its aliases; the versions a search returns do not (their
        # `aliases` is empty on the SQL store), so read them from the model.
        aliases = {}
        for alias, version in sorted(model.aliases.items()):
            aliases.setdefault(str(version), []).append(alias)
        for v in client.search_model_versions(f"name='{model.name}'"):
            rows.append({
                "name": model.name,
                "version": str(v.version),
                "aliases": aliases.get(str(v.version), []),
                "stage": v.tags.get("llm.stage", ""),
                "created": _when(v.creation_timestamp),
            })
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def recent_runs(recipe: str | None, limit: int) -> list[dict]:
    from mlflow.tracking import MlflowClient

    configure()
    mark_orphaned_runs()  # a run whose process was killed reads KILLED, not RUNNING
    client = MlflowClient()
    experiments = [e for e in client.search_experiments() if recipe in (None, e.name)]
    if not experiments:
        return []
    names = {e.experiment_id: e.name for e in experiments}
    runs = client.search_runs(list(names), order_by=["attributes.start_time DESC"], max_results=limit)
    return [
        {
            "experiment": names[r.info.experiment_id],
            "run": r.info.run_name,
            "stage": r.data.tags.get("llm.stage", ""),
            "status": r.info.status,
            "started": _when(r.info.start_time),
            "duration_s": f"{(r.info.end_time - r.info.start_time) / 1000:.1f}" if r.info.end_time else "",
            "run_id": r.info.run_id,
        }
        for r in runs
    ]


# ---- pipelines to compare -------------------------------------------------------------------


def _client():
    from mlflow.tracking import MlflowClient

    configure()
    return MlflowClient()


def _get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def pipeline_runs(ref: str) -> list:
    """The pipeline (parent) runs a reference names.

    A pipeline run id -> that run; a sweep run id -> its pipelines; a stage run id -> its
    pipeline; a recipe (experiment) name -> its latest finished pipeline. Raises LookupError
    naming what was not found.
    """
    client = _client()
    run = _get_run(client, ref) if re.fullmatch(r"[0-9a-f]{32}", ref) else None
    if run is not None:
        stage = run.data.tags.get("llm.stage")
        if stage == "pipeline":
            return [run]
        if stage == "sweep":
            return client.search_runs(
                [run.info.experiment_id], f"tags.llm.sweep = '{ref}' AND tags.llm.stage = 'pipeline'",
                order_by=["attributes.start_time ASC"],
            )
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            return pipeline_runs(parent)
        raise LookupError(f"run {ref} is not a pipeline, sweep or stage run of llm")
    exp = client.get_experiment_by_name(ref)
    if exp is None:
        raise LookupError(f"'{ref}' is neither a run id nor a recipe with runs in {tracking_uri()}")
    runs = client.search_runs(
        [exp.experiment_id], "tags.llm.stage = 'pipeline' AND attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        raise LookupError(f"recipe '{ref}' has no finished pipeline run yet; run `llm pipeline {ref}` first")
    return runs


def stage_runs(pipeline_run) -> dict[str, object]:
    """The stage runs nested under a pipeline run, by stage name."""
    client = _client()
    children = client.search_runs(
        [pipeline_run.info.experiment_id], f"tags.mlflow.parentRunId = '{pipeline_run.info.run_id}'"
    )
    return {r.data.tags.get("llm.stage", r.info.run_name): r for r in children}


def metric_history(run_id: str, key: str) -> tuple[list[int], list[float]]:
    history = sorted(_client().get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [m.step for m in history], [m.value for m in history]
