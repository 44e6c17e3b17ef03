"""Serve a registered model version over HTTP with MLflow's own model server.

`llm serve --model models:/NAME@ALIAS` runs `mlflow models serve -m models:/NAME@ALIAS
--env-manager local` against the workspace's tracking store: POST /invocations with
{"inputs": ["prompt", ...]} answers {"predictions": ["continuation", ...]}.
"""

from __future__ import annotations

import sys

from llm_lifecycle.workflows.runner.stage import UserError


def check_registered(model: str) -> None:
    """A clear error now, rather than a server that dies while loading."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from llm_lifecycle.registry.tracking import configure

    if not model.startswith("models:/"):
        raise UserError(f"llm serve: --model {model}: give a registered version, models:/NAME@ALIAS or models:/NAME/VERSION")
    configure()
    name, _, which = model.removeprefix("models:/").partition("@")
    client = MlflowClient()
    try:
        if which:
            client.get_model_version_by_alias(name, which)
        else:
            name, _, version = name.partition("/")
            client.get_model_version(name, version)
    except MlflowException as err:
        raise UserError(f"llm serve: {model}: {err.message.splitlines()[0]}; see `llm models list`") from None
    check_logged_as_our_code(model)


def check_logged_as_our_code(model: str) -> None:
    """Serving a version runs the code file logged with it (models-from-code): refuse one
    logged as a pickle (by a version of llm-lifecycle before issue 22) or whose code file
    is not this package's own, before the server runs anything."""
    import importlib.util
    from pathlib import Path

    import mlflow

    from llm_lifecycle.registry.tracking import PYFUNC_CODE

    info = mlflow.models.get_model_info(model)
    flavor = info.flavors.get("python_function", {})
    ours = Path(importlib.util.find_spec(PYFUNC_CODE).origin)
    as_code = (Path(flavor.get("model_code_path") or "").name == ours.name
               and flavor.get("loader_module") == "mlflow.pyfunc.loaders.code_model"
               and not flavor.get("code"))  # logged code folders would go first on sys.path, shadowing ours
    if not as_code:
        raise UserError(f"llm serve: {model} was not logged as llm-lifecycle code (an older version logged pickles, "
                        "which run code when loaded); it was not loaded; re-run the stage that made it to register it anew")
    logged = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{info.artifact_path}/{ours.name}"))
    if logged.read_bytes() != ours.read_bytes():
        raise UserError(f"llm serve: {model}: its code file {ours.name} differs from this llm-lifecycle's; "
                        "it was not run; re-run the stage that made it to register it anew")


def serve_command(model: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of the MLflow model server for `model`."""
    from llm_lifecycle.registry.tracking import environ_snapshot, tracking_uri

    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
            "--host", host, "--port", str(port)]
    # Our models are code: a pickle in the artifact store (a tampered MLmodel naming one) is refused, not run.
    return argv, {**environ_snapshot(), "MLFLOW_TRACKING_URI": tracking_uri(), "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
