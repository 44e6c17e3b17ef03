"""MLflow tracking for pipelines and stages, and the Model Registry.

Conventions (DESIGN.md): experiment = recipe name; one parent run per invocation; one
nested run per stage named after it; `llm.*` and `hw.*` tags; per-step metrics logged
asynchronously; each model-making stage logs a pyfunc model and registers a version of
the model named after the recipe, with the stage as alias.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from llm_lifecycle.registry.hardware import hardware_profile

PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer param values


def workspace() -> Path:
    """The workspace root: $LLM_HOME, else ./llm-runs."""
    return Path(os.environ.get("LLM_HOME", "llm-runs")).resolve()


def tracking_uri(ws: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(ws or workspace()) / 'mlflow.db'}"


def is_embedded_store(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def configure(ws: Path | None = None) -> str:
    """Point MLflow at the workspace store (or $MLFLOW_TRACKING_URI) and return the URI."""
    import mlflow

    ws = ws or workspace()
    ws.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(ws)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(name: str, ws: Path | None = None) -> str:
    """The experiment id for `name`; new embedded experiments keep artifacts in the workspace."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if is_embedded_store(tracking_uri(ws)):
        location = ((ws or workspace()) / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists are JSON-encoded; long values truncated."""
    if isinstance(config, dict):
        out: dict[str, str] = {}
        for key, value in config.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    text = json.dumps(config) if isinstance(config, (list, tuple)) else str(config)
    return {prefix.rstrip("."): text[:PARAM_VALUE_LIMIT]}


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def file_digest(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files in name order."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class MlflowTracker:
    """The stage-facing `Tracker` (workflows/stage.py) bound to one MLflow run."""

    def __init__(self, run_id: str):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            mlflow.log_metrics(clean, step=step, run_id=self.run_id, synchronous=False)

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        flat = flatten(params)
        if flat:
            mlflow.log_params(flat, run_id=self.run_id, synchronous=False)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict | list, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_input(self, path: str | Path, name: str, context: str) -> None:
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        source = HTTPDatasetSource(url=Path(path).resolve().as_uri())
        dataset = MetaDataset(source=source, name=name, digest=file_digest(path)[:16])
        tags = [InputTag(key="mlflow.data.context", value=context)]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])

    def flush(self) -> None:
        import mlflow

        mlflow.flush_async_logging()


class NullTracker:
    """The tracker of torchrun ranks other than 0: rank 0 alone records the run."""

    run_id = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, data: dict | list, artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_input(self, path: str | Path, name: str, context: str) -> None:
        pass

    def flush(self) -> None:
        pass


@contextmanager
def start_run(
    experiment: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None
) -> Iterator[MlflowTracker | NullTracker]:
    """An MLflow run with hardware tags and system metrics; marked FAILED/KILLED on error.
    Under torchrun only rank 0 opens runs; the other ranks get a NullTracker."""
    import mlflow

    from llm_lifecycle.registry.hardware import is_main_process

    if not is_main_process():
        yield NullTracker()
        return
    exp_id = ensure_experiment(experiment)
    all_tags = {**hardware_profile(), **tags}
    commit = git_commit()
    if commit:
        all_tags["llm.git_commit"] = commit
    with mlflow.start_run(
        experiment_id=exp_id,
        run_name=run_name,
        nested=parent_run_id is not None,
        parent_run_id=parent_run_id,
        tags=all_tags,
        log_system_metrics=True,
    ) as run:
        tracker = MlflowTracker(run.info.run_id)
        try:
            yield tracker
        finally:
            tracker.flush()


def log_and_register_model(
    tracker: MlflowTracker,
    model_dir: str | Path,
    registered_name: str,
    aliases: list[str],
    tags: dict[str, str],
) -> str:
    """Log `model_dir` as a pyfunc text-generation model; register it; point the aliases at it.

    Returns the new version number.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from llm_lifecycle import __version__
    from llm_lifecycle.models.pyfunc import TextGenerationModel

    with _active(tracker.run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=TextGenerationModel(),
            artifacts={"model_dir": str(model_dir)},
            input_example=["Once upon a time"],
            pip_requirements=[f"llm-lifecycle=={__version__}"],
            registered_model_name=registered_name,
        )
    client = MlflowClient()
    version = str(info.registered_model_version)
    for alias in aliases:
        client.set_registered_model_alias(registered_name, alias, version)
    for key, value in {**hardware_profile(), **tags}.items():
        client.set_model_version_tag(registered_name, version, key, str(value))
    return version


@contextmanager
def _active(run_id: str) -> Iterator[None]:
    """Make `run_id` the active fluent run for APIs (log_model) that only use the active run."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield


def registered_version(ref: str) -> tuple[str, str] | None:
    """(name, version) that `models:/NAME@ALIAS` or `models:/NAME/VERSION` points at; None otherwise."""
    from mlflow.tracking import MlflowClient

    if not ref.startswith("models:/"):
        return None
    name, _, rest = ref.removeprefix("models:/").partition("/")
    client = MlflowClient()
    if "@" in name:
        name, alias = name.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    return (name, rest) if rest.isdigit() else None


def version_with_fingerprint(name: str, fingerprint: str) -> str | None:
    """The version of `name` a pipeline stage with this fingerprint registered, if any."""
    from mlflow.tracking import MlflowClient

    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    found = [v for v in versions if v.tags.get("llm.fingerprint") == fingerprint]
    return str(max(int(v.version) for v in found)) if found else None


def link_eval_run(tracker: MlflowTracker, name: str, version: str, scores: dict[str, float]) -> None:
    """Make an eval run and the model version it scored point at each other: tags on both, and
    the scores also logged against the version's MLflow model (they show on its model page)."""
    import mlflow

    client = tracker.client
    model_version = client.get_model_version(name, version)
    tracker.set_tags({"llm.model_version_uri": f"models:/{name}/{version}", "llm.model_name": name,
                      "llm.model_version": version})
    client.set_model_version_tag(name, version, "llm.eval_run_id", tracker.run_id)
    for key, value in scores.items():
        client.set_model_version_tag(name, version, key, f"{value:.6g}")
    if model_version.model_id:
        mlflow.log_metrics(scores, run_id=tracker.run_id, model_id=model_version.model_id)
