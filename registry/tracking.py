"""MLflow tracking for pipelines and stages, and the Model Registry.

Conventions (README.md, "Where results appear"): experiment = recipe name; one parent run
per invocation; one nested run per stage named after it; `llm.*` and `hw.*` tags; per-step
metrics logged asynchronously; each model-making stage logs a pyfunc model and registers a
version of the model named after the recipe, with the stage as alias.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from llm_lifecycle.registry.hardware import hardware_profile

PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer param values
REDACTED = "[REDACTED]"
PYFUNC_CODE = "llm_lifecycle.models.pyfunc_model"  # the file each registered model is logged as
# Setting names whose (text) values are credentials. "token" but not "tokenizer"/"tokenize".
SECRET_NAME = re.compile(r"secret|passw(?:or)?d|api[-_]?key|credential|token(?!i[sz])", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
_ASSIGNED_SECRET = re.compile(
    r"([\w.-]*(?:secret|passw(?:or)?d|api[-_]?key|credential|token(?!i[sz]))[\w.-]*[\"']?[ \t]*[=:][ \t]*[\"']?)"
    r"(?![\d.]+\b|\[REDACTED\])[^\s,;'\"}\]]+",
    re.IGNORECASE,
)  # [ \t], not \s: a match never runs across a line into the next one's text
_METRIC_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-.:/ ]")  # MLflow accepts nothing else in a metric name


def workspace() -> Path:
    """The workspace root: $LLM_HOME, else ./llm-runs."""
    return Path(os.environ.get("LLM_HOME", "llm-runs")).resolve()


# The workspace store configure() last chose. mlflow.set_tracking_uri exports its URI as
# MLFLOW_TRACKING_URI (for subprocesses), so that variable holding this value is our own echo,
# not the user's choice: a later configure() for another workspace must not follow it.
_workspace_uri: str | None = None


def tracking_uri(ws: Path | None = None) -> str:
    given = os.environ.get("MLFLOW_TRACKING_URI")
    if given and given != _workspace_uri:
        return given
    return f"sqlite:///{(ws or workspace()) / 'mlflow.db'}"


def is_embedded_store(uri: str) -> bool:
    return uri.startswith("sqlite:///")


class EnvironmentProblem(Exception):
    """The workspace or the tracking server cannot be used: the user fixes the environment
    (the CLI prints it as one line, exit code 2, like a UserError)."""


def configure(ws: Path | None = None) -> str:
    """Point MLflow at the workspace store (or $MLFLOW_TRACKING_URI) and return the URI."""
    import mlflow

    ws = ws or workspace()
    _require_writable_folder(ws)
    uri = tracking_uri(ws)
    if uri.startswith(("http://", "https://")):
        _require_answering_server(uri)
    global _workspace_uri
    if uri != os.environ.get("MLFLOW_TRACKING_URI"):
        _workspace_uri = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if is_embedded_store(uri):
        _create_store_once(ws)
    return uri


def _require_writable_folder(ws: Path) -> None:
    """The workspace is a folder we can write (created when missing)."""
    import tempfile

    try:
        ws.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=ws):  # a name of its own: torchrun's ranks check at once
            pass
    except OSError as err:
        why = "it is a file, not a folder" if ws.is_file() else err.strerror or str(err)
        raise EnvironmentProblem(
            f"workspace {ws} (LLM_HOME, default ./llm-runs) cannot be used: {why}; "
            "point LLM_HOME at a folder you can write"
        ) from None


# A tracking server that does not answer this fast is down; MLflow's own retries would
# take minutes to say so.
SERVER_PROBE_TIMEOUT_S = 5.0


def _require_answering_server(uri: str) -> None:
    """One request to the MLflow API with MLflow's credentials, no retries: down, not MLflow,
    or refusing the credentials is one line within seconds."""
    from mlflow.tracking._tracking_service.utils import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    where = f"MLFLOW_TRACKING_URI={redact_text(uri)}"
    try:
        answer = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                              max_retries=0, timeout=SERVER_PROBE_TIMEOUT_S, raise_on_status=False,
                              params={"max_results": 1})
    except Exception as err:  # refused, timed out, no route, TLS: every way of not answering
        raise EnvironmentProblem(
            f"{where}: the tracking server does not answer ({_one_line(err)}); start it, fix the address, "
            "or unset MLFLOW_TRACKING_URI to use the workspace's own store"
        ) from None
    if answer.status_code in (401, 403):
        raise EnvironmentProblem(f"{where}: the tracking server refused our credentials (HTTP {answer.status_code}); "
                                 "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    if answer.status_code != 200:
        raise EnvironmentProblem(f"{where}: answers HTTP {answer.status_code} to the MLflow tracking API; "
                                 "is it an MLflow tracking server? fix the address or unset MLFLOW_TRACKING_URI")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return redact_text(text if len(text) <= 200 else text[:197] + "...")


def _create_store_once(ws: Path) -> None:
    """Open (and on first use create) the sqlite store under a file lock: two processes
    creating the same fresh store at once would both try to create its tables."""
    import fcntl

    from mlflow.tracking import MlflowClient

    with open(ws / ".mlflow.db.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = ws / "mlflow.db"
        if not store.exists() and tracking_uri(ws) == f"sqlite:///{store}":
            _copy_empty_store(store, ws)
        client = MlflowClient()
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)


def _copy_empty_store(store: Path, ws: Path) -> None:
    """A new workspace's store is a copy of an empty, migrated store made once per MLflow
    version: creating one runs MLflow's ~70 schema migrations, seconds on a quiet machine and
    over a minute on a loaded one, which every new workspace (and every test) would pay."""
    import sqlite3

    template = _empty_store_template()
    if template is None:  # no cache folder we can write: MLflow creates the store itself
        return
    partial = ws / f".mlflow.db.{os.getpid()}.partial"
    shutil.copyfile(template, partial)
    with sqlite3.connect(partial) as db:  # MLflow puts Default's artifacts under the cwd it was made in
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                   ((ws / "mlartifacts" / "Default").as_uri(),))
    os.replace(partial, store)


def _empty_store_template() -> Path | None:
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-lifecycle"
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if template.exists():
        return template
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then renamed: never half-made
            made = Path(tmp) / "empty.db"
            MlflowClient(tracking_uri=f"sqlite:///{made}").search_experiments(max_results=1)
            os.replace(made, template)
    except OSError:
        return None
    return template


def ensure_experiment(name: str, ws: Path | None = None) -> str:
    """The experiment id for `name`; new embedded experiments keep artifacts in the workspace."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if is_embedded_store(tracking_uri(ws)):
        location = ((ws or workspace()) / "mlartifacts" / name).as_uri()
    try:
        # Without the kind, MLflow 3's UI opens experiments on its GenAI trace views.
        return client.create_experiment(name, artifact_location=location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except MlflowException:  # another process created it a moment ago
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ---------------------------------------------------------------------------------------
# Secrets (HF tokens, MLflow credentials, anything named *token*/*secret*/*password*) never
# reach the tracking store: every param, tag and text artifact we log goes through these.


def environ_snapshot() -> dict[str, str]:
    """A copy of os.environ that other threads changing it cannot break. Copying walks the
    keys and then looks each one up, and MLflow's telemetry thread sets and removes
    _MLFLOW_TELEMETRY_SESSION_ID meanwhile: a key gone between the two is a KeyError, a key
    added during the walk a RuntimeError. Both are transient, so copy again."""
    while True:
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue


def _secret_env_values() -> list[str]:
    """Values of environment variables named like credentials (HF_TOKEN, MLFLOW_TRACKING_PASSWORD...)."""
    return sorted(
        (v for k, v in environ_snapshot().items() if SECRET_NAME.search(k) and len(v) >= 6),
        key=len, reverse=True,
    )


def redact_text(text: str) -> str:
    """`text` with credentials in URLs, HF tokens, `password=...` pairs and the values of
    secret environment variables replaced by [REDACTED]."""
    for value in _secret_env_values():
        text = text.replace(value, REDACTED)
    text = _URL_CREDENTIALS.sub(rf"\1{REDACTED}@", text)
    text = _HF_TOKEN.sub(REDACTED, text)
    return _ASSIGNED_SECRET.sub(rf"\1{REDACTED}", text)


def redact(data: Any, key: str = "") -> Any:
    """A copy of `data` (nested dicts/lists/strings) safe to log: text under a secret-looking
    name is replaced whole; other text is scrubbed. Numbers and booleans are never secrets
    (so `train_tokens` stays), only text is."""
    if isinstance(data, dict):
        return {k: redact(v, str(k)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact(v, key) for v in data]
    if isinstance(data, str):
        return REDACTED if SECRET_NAME.search(key.rsplit(".", 1)[-1]) else redact_text(data)
    return data


def metric_key(name: str) -> str:
    """`name` (which may hold a data path or URI) as a metric name: redacted first, since
    replacing `=` and `:` by `_` hides `token=...` from the redaction."""
    return _METRIC_KEY_UNSAFE.sub("_", redact_text(name))


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists are JSON-encoded; long values truncated;
    secrets redacted."""
    if isinstance(config, dict):
        out: dict[str, str] = {}
        for key, value in config.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    key = prefix.rstrip(".")
    config = redact(config, key)
    text = json.dumps(config) if isinstance(config, (list, tuple)) else str(config)
    return {key: text[:PARAM_VALUE_LIMIT]}


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
    """The stage-facing `Tracker` (workflows/runner/stage.py) bound to one MLflow run."""

    def __init__(self, run_id: str):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()
        self._metric_keys: dict[str, str] = {}  # name -> metric_key(name): per-step logging redacts each name once

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        keys = self._metric_keys
        clean = {keys.get(k) or keys.setdefault(k, metric_key(k)): float(v) for k, v in metrics.items() if v is not None}
        if clean:
            mlflow.log_metrics(clean, step=step, run_id=self.run_id, synchronous=False)

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        flat = flatten(params)
        if flat:
            mlflow.log_params(flat, run_id=self.run_id, synchronous=False)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, redact(str(value), key))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict | list, artifact_file: str) -> None:
        import yaml

        clean = redact(data)
        if artifact_file.endswith((".yaml", ".yml")):  # MLflow's own dump sorts keys: a recipe's stages would reorder
            self.client.log_text(self.run_id, yaml.safe_dump(clean, sort_keys=False, allow_unicode=True), artifact_file)
        else:
            self.client.log_dict(self.run_id, clean, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact_text(text), artifact_file)

    def log_input(self, path: str | Path, name: str, context: str) -> None:
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        # Redacted before it becomes a URI: as_uri() percent-encodes `token=` past the pattern.
        source = HTTPDatasetSource(url=Path(redact_text(str(Path(path).resolve()))).as_uri())
        dataset = MetaDataset(source=source, name=redact_text(name), digest=file_digest(path)[:16])
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


# ---------------------------------------------------------------------------------------
# Run lifecycle: a run ends FINISHED, FAILED (an error) or KILLED (a signal, or its process
# vanished). Each run records which process owns it, so the next start can close the runs
# of a process that was SIGKILLed or lost its machine's power.


def _owner_tags() -> dict[str, str]:
    import psutil

    me = psutil.Process()
    return {"llm.host": socket.gethostname(), "llm.pid": str(me.pid), "llm.pid_started": f"{me.create_time():.3f}"}


def _owner_gone(tags: dict[str, str]) -> bool:
    """True when the run's process is known to be gone: it ran on this host and that pid is
    free, a zombie, or now belongs to a process started at another time. Runs from other
    hosts, or without owner tags, are never judged."""
    import psutil

    if tags.get("llm.host") != socket.gethostname() or not tags.get("llm.pid", "").isdigit():
        return False
    try:
        proc = psutil.Process(int(tags["llm.pid"]))
        return proc.status() == psutil.STATUS_ZOMBIE or f"{proc.create_time():.3f}" != tags.get("llm.pid_started")
    except psutil.NoSuchProcess:
        return True


def mark_orphaned_runs() -> list[str]:
    """Mark KILLED every RUNNING run whose owning process is gone; returns their ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    orphans = [
        r for r in client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=5000)
        if _owner_gone(r.data.tags)
    ]
    for run in orphans:
        client.set_tag(run.info.run_id, "llm.end_reason",
                       f"process {run.data.tags['llm.pid']} ended without closing the run (killed)")
        client.set_terminated(run.info.run_id, "KILLED")
    return [r.info.run_id for r in orphans]


@dataclass
class RunRef:
    run_id: str
    parent_run_id: str | None


def unfinished_run(experiment: str, tags: dict[str, str]) -> RunRef | None:
    """The latest run in `experiment` with these tags that did not finish (killed, failed)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = " and ".join([f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status != 'FINISHED'"])
    runs = client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    return RunRef(runs[0].info.run_id, runs[0].data.tags.get("mlflow.parentRunId"))


def _end_status(err: BaseException) -> str:
    # SIGTERM/SIGHUP become SystemExit (cli/app.py) and SIGINT KeyboardInterrupt: a kill, not a bug.
    return "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"


@contextmanager
def start_run(
    experiment: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None
) -> Iterator[MlflowTracker | NullTracker]:
    """An MLflow run with hardware and owner tags and system metrics; it ends FINISHED,
    FAILED (with the error as `llm.error`) or KILLED. A top-level run first closes the
    runs that killed processes left RUNNING. Under torchrun only rank 0 opens runs; the
    other ranks get a NullTracker."""
    import mlflow

    from llm_lifecycle.workflows.engine.ranks import is_main_process

    if not is_main_process():
        yield NullTracker()
        return
    if parent_run_id is None:
        mark_orphaned_runs()
    exp_id = ensure_experiment(experiment)
    all_tags = {**hardware_profile(), **_owner_tags(), **tags}
    commit = git_commit()
    if commit:
        all_tags["llm.git_commit"] = commit
    run = mlflow.start_run(
        experiment_id=exp_id,
        run_name=run_name,
        nested=parent_run_id is not None,
        parent_run_id=parent_run_id,
        tags={k: redact(str(v), k) for k, v in all_tags.items()},
        log_system_metrics=True,
    )
    tracker = MlflowTracker(run.info.run_id)
    status = "FINISHED"
    try:
        yield tracker
    except BaseException as err:
        status = _end_status(err)
        message = " ".join(str(err).split())[:500] or type(err).__name__
        try:
            tracker.set_tags({"llm.error": f"{type(err).__name__}: {message}"})
        except Exception:  # the store itself may be what failed; the status still matters
            pass
        raise
    finally:
        try:
            tracker.flush()
        finally:
            mlflow.end_run(status)


def log_and_register_model(
    tracker: MlflowTracker,
    model_dir: str | Path,
    registered_name: str,
    aliases: list[str],
    tags: dict[str, str],
) -> str:
    """Log `model_dir` as a pyfunc text-generation model; register it; point the aliases at it.
    The model is logged as code (models/pyfunc_model.py), never as a pickle, so loading it
    unpickles nothing.

    Returns the new version number.
    """
    import importlib.util

    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from llm_lifecycle import __version__
    from llm_lifecycle.models.pyfunc import PARAMS  # the logged code's own generation params

    with _active(tracker.run_id), warnings.catch_warnings():
        # on purpose, see below; MLflow starts the message with a colour code
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=importlib.util.find_spec(PYFUNC_CODE).origin,
            artifacts={"model_dir": str(model_dir)},
            # The signature (text in, text out) given, not inferred from an input example:
            # with an example MLflow loads the model and generates twice per version (to infer
            # the signature, then to check serving): 11-15 CPU s per version against 0.1 s,
            # for a model the stage has just trained and measured.
            # The params schema lets callers pass generation params (MLflow drops params a
            # signature does not declare).
            signature=infer_signature(["Once upon a time"], ["a continuation"], params=PARAMS),
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
