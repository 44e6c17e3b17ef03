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
    _read_config(folder)
    _check_weights(folder)
    try:
        model, tokenizer = load_hf(folder)
    except (ValueError, FileNotFoundError, KeyError) as err:  # KeyError: config.json lacks a setting
        raise UserError(f"cannot import {source}: {err}") from None
    save_model_dir(out, model, tokenizer, extra={"imported_from": source})
    return model.cfg


def import_into_user_folder(source: str, out: Path, overwrite: bool):
    """`llm import`: import_model into the user's folder `out`, never over their files
    (workflows/outputs.py); checked before anything is downloaded."""
    from llm_lifecycle.workflows.outputs import output_folder

    with output_folder(Path(out).absolute(), overwrite, "llm import") as staged:
        return import_model(source, staged)


def _read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise UserError(f"{folder}: no config.json; expected one of our model folders or a Hugging Face folder")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{file}: not valid JSON ({str(err)[:200]}); restore the model's config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{file}: expected a JSON object, found {type(config).__name__}")
    return config


def _check_weights(folder: Path) -> None:
    """Every safetensors file's header must read and cover its file, so a truncated download
    or a pickle under a .safetensors name is refused before anything loads the folder."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: config.json but no weights (model.safetensors); copy the model's weights there "
                        "or export the model again (pickles such as pytorch_model.bin are never opened: convert them "
                        "to safetensors first)")
    for file in files:
        try:
            with safe_open(file, "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise UserError(f"{file}: not a readable safetensors file ({err}); it is cut short or not safetensors "
                            "(pickles are never loaded): download or export the model again") from None


def resolve_model_dir(ref: str) -> Path:
    from llm_lifecycle.registry.tracking import workspace

    if ref.startswith(("models:/", "runs:/")):
        return _from_mlflow(ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        if _read_config(path).get("format") != "llm-lifecycle":
            return _import_hf_folder(path, workspace())
        _check_weights(path)
        return path
    if ref.count("/") == 1 and not path.exists():
        return _import_hf_folder(_hub_snapshot(ref), workspace())
    raise UserError(f"model not found: {ref}; give models:/NAME@ALIAS, a folder, or a Hugging Face repo id")
