"""Any model reference a command accepts -> one of our model directories.

`models:/NAME@ALIAS` (or `models:/NAME/VERSION`, `runs:/...`) from the MLflow registry, a
local folder in our layout, a local Hugging Face folder (imported), or a hub repo id.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llm_lifecycle.workflows.stage import UserError


def _from_mlflow(ref: str) -> Path:
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    from llm_lifecycle.registry.tracking import configure

    configure()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
    except MlflowException as err:
        raise UserError(f"cannot resolve {ref}: {err.message.splitlines()[0]}; see `llm models list`") from None
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    return local / flavor["artifacts"]["model_dir"]["path"]


def _import_hf_folder(folder: Path, workspace: Path) -> Path:
    """Imported once into the workspace (keyed by the folder's path), then reused."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    out = workspace / "imports" / key
    if not (out / "config.json").is_file():
        import_model(str(folder), out)
    return out


def _hub_snapshot(repo_id: str) -> Path:
    """The hub repo's config, safetensors weights and tokenizer files, downloaded (or cached)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as err:  # offline, unknown repo, auth: all a user's fix
        raise UserError(f"cannot fetch {repo_id} from the Hugging Face hub ({type(err).__name__}); "
                        "check the id and the network, or pass a local folder or a models:/ URI") from None


def import_model(source: str, out: Path):
    """`llm import`: a Hugging Face folder or hub id -> our model folder at `out`; its ModelConfig."""
    from llm_lifecycle.models.checkpoint import save_model_dir
    from llm_lifecycle.models.hf import load_hf

    folder = Path(source).expanduser()
    if not folder.is_dir():
        if source.count("/") != 1:
            raise UserError(f"{source}: not a folder or a Hugging Face repo id (OWNER/NAME)")
        folder = _hub_snapshot(source)
    try:
        model, tokenizer = load_hf(folder)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(f"cannot import {source}: {err}") from None
    save_model_dir(out, model, tokenizer, extra={"imported_from": source})
    return model.cfg


def import_into_user_folder(source: str, out: Path, overwrite: bool):
    """`llm import`: import_model into the user's folder `out`, never over their files
    (workflows/outputs.py); checked before anything is downloaded."""
    from llm_lifecycle.workflows.outputs import output_folder

    with output_folder(Path(out).absolute(), overwrite, "llm import") as staged:
        return import_model(source, staged)


def resolve_model_dir(ref: str) -> Path:
    from llm_lifecycle.registry.tracking import workspace

    if ref.startswith(("models:/", "runs:/")):
        return _from_mlflow(ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UserError(f"{path}: no config.json; expected one of our model folders or a Hugging Face folder")
        config = json.loads(config_file.read_text())
        return path if config.get("format") == "llm-lifecycle" else _import_hf_folder(path, workspace())
    if ref.count("/") == 1 and not path.exists():
        return _import_hf_folder(_hub_snapshot(ref), workspace())
    raise UserError(f"model not found: {ref}; give models:/NAME@ALIAS, a folder, or a Hugging Face repo id")
