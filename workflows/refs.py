"""The one resolver for every reference a recipe or command gives.

Data: `builtin:NAME` (shipped under workflows/data/builtin, never outside it) or a local
path. Models: `models:/NAME@ALIAS` (or `models:/NAME/VERSION`, `runs:/...`) from the MLflow
registry, a local folder in our layout, a local Hugging Face folder (imported), or a hub
repo id. Everything from the Hugging Face hub (datasets, checkpoints, tokenizers) comes
through `hub_snapshot`, with one error policy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llm_lifecycle.workflows.runner.stage import UserError

BUILTIN_DIR = Path(__file__).parent / "data" / "builtin"


def list_builtin() -> list[str]:
    """Every `builtin:` name: the shipped folders and the data files in them (not their
    licence texts and provenance notes)."""
    names = []
    for path in sorted(BUILTIN_DIR.rglob("*")):
        relative = path.relative_to(BUILTIN_DIR)
        if not ("licenses" in relative.parts or path.suffix == ".md" or path.name.startswith((".", "__"))):
            names.append(relative.as_posix())
    return names


def builtin_path(name: str, key: str) -> Path:
    path = (BUILTIN_DIR / name).resolve()
    if not name or not path.is_relative_to(BUILTIN_DIR.resolve()) or not path.exists():
        known = ", ".join(f"builtin:{n}" for n in list_builtin())
        raise UserError(f"{key}: unknown built-in data 'builtin:{name}'; shipped: {known}")
    return path


def data_path(uri: str, key: str) -> Path:
    """`builtin:chat/x.jsonl` -> the shipped file; anything else is a local path that must exist."""
    if uri.startswith("builtin:"):
        return builtin_path(uri.removeprefix("builtin:"), key)
    path = Path(uri).expanduser()
    if not path.exists():
        raise UserError(f"{key}: data file not found: {uri}; give an existing path or a builtin: name")
    return path


def data_state(text: str) -> list[tuple[str, int, int]] | None:
    """What a data reference (`builtin:NAME` or a local file or folder) holds now, as make sees
    it: (file, size, modification time) per file; None for anything else. Stage fingerprints
    include it, so editing a data file (yours, or one shipped data set regenerated between
    releases of the same version) reruns the stages that read it instead of reusing results
    made from the old contents. Sizes and times, not content hashes: a pretraining corpus can be
    many gigabytes, and every `llm pipeline` computes every fingerprint."""
    if text.startswith("builtin:"):
        try:
            path = builtin_path(text.removeprefix("builtin:"), "")
        except UserError:  # not shipped (or outside the shipped folder): the stage that reads it says so
            return None
    elif not text or not (path := Path(text).expanduser()).exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(f.relative_to(path)), (st := f.stat()).st_size, st.st_mtime_ns) for f in files]


def read_data_files(uris: list[str], key: str, read) -> list:
    """Every record `read(path)` gives for each data reference, in order; a file `read`
    rejects (ValueError) is one line naming `key`."""
    records = []
    for uri in uris:
        try:
            records.extend(read(data_path(uri, key)))
        except ValueError as err:
            raise UserError(f"{key}: {err}") from None
    return records


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def hub_snapshot(repo_id: str, key: str, repo_type: str = "model", revision: str | None = None,
                 allow_patterns: list[str] | None = None) -> Path:
    """A Hugging Face hub repository's files (only `allow_patterns`), downloaded or from the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    kind = "dataset hf://datasets/" if repo_type == "dataset" else ""
    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type=repo_type, revision=revision,
                                      allow_patterns=allow_patterns))
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise UserError(
            f"{key}: Hugging Face {kind}{repo_id} not found ({one_line(err)}); check the name and revision, "
            "or log in (`hf auth login`) for a gated or private repository"
        ) from None
    except Exception as err:  # offline, DNS, HTTP, cache: all mean "nothing from the hub"
        raise UserError(
            f"{key}: cannot reach the Hugging Face hub to fetch {kind}{repo_id}: {one_line(err)}; "
            "use a local path (or builtin:NAME for data), or set HF_HUB_OFFLINE=0 with network"
        ) from None




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


def _hub_checkpoint(repo_id: str) -> Path:
    """The hub repo's config, safetensors weights and tokenizer files."""
    return hub_snapshot(repo_id, repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])


def import_model(source: str, out: Path):
    """`llm import`: a Hugging Face folder or hub id -> our model folder at `out`; its ModelConfig."""
    from llm_lifecycle.models.checkpoint import save_model_dir
    from llm_lifecycle.models.hf import load_hf

    folder = Path(source).expanduser()
    if not folder.is_dir():
        if source.count("/") != 1:
            raise UserError(f"{source}: not a folder or a Hugging Face repo id (OWNER/NAME)")
        folder = _hub_checkpoint(source)
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
        return _import_hf_folder(_hub_checkpoint(ref), workspace())
    raise UserError(f"model not found: {ref}; give models:/NAME@ALIAS, a folder, or a Hugging Face repo id")
