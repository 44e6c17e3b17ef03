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
    from llm_lifecycle.models.checkpoint import save_model_dir
    from llm_lifecycle.models.hf import load_hf

    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    out = workspace / "imports" / key
    if not (out / "config.json").is_file():
        try:
            model, tokenizer = load_hf(folder)
        except (ValueError, FileNotFoundError) as err:
            raise UserError(f"cannot import {folder}: {err}") from None
        save_model_dir(out, model, tokenizer, extra={"imported_from": str(folder)})
    return out


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
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
        except Exception as err:  # offline, unknown repo, auth: all a user's fix
            raise UserError(f"cannot fetch {ref} from the Hugging Face hub ({type(err).__name__}); "
                            "pass a local folder or a models:/ URI") from None
        return _import_hf_folder(Path(folder), workspace())
    raise UserError(f"model not found: {ref}; give models:/NAME@ALIAS, a folder, or a Hugging Face repo id")
