"""Serve a registered model version over HTTP with MLflow's own model server.

`llm serve --model models:/NAME@ALIAS` runs `mlflow models serve -m models:/NAME@ALIAS
--env-manager local` against the workspace's tracking store: POST /invocations with
{"inputs": ["prompt", ...]} answers {"predictions": ["continuation", ...]}.
"""

from __future__ import annotations

import os
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


def serve_command(model: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of the MLflow model server for `model`."""
    from llm_lifecycle.registry.tracking import tracking_uri

    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
            "--host", host, "--port", str(port)]
    return argv, {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}
