"""Read-side views of the tracking store for `llm models list` and `llm runs list`."""

from __future__ import annotations

import datetime as dt

from llm_lifecycle.registry.tracking import configure, mark_orphaned_runs


def _when(ms: int | None) -> str:
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M") if ms else ""


def registered_versions() -> list[dict]:
    from mlflow.tracking import MlflowClient

    configure()
    client = MlflowClient()
    rows = []
    for model in client.search_registered_models():
        for v in client.search_model_versions(f"name='{model.name}'"):
            rows.append({
                "name": model.name,
                "version": str(v.version),
                "aliases": list(v.aliases),
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
