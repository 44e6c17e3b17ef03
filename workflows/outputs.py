"""Folders a command writes at a path the user gave (`llm export --out`, `llm import --out`).

Such a folder is replaced whole (atomically), so it must never hold anything of the
user's: each one we write lists its files in `.llm-output.json`, and a target may be new,
empty, or a folder of ours holding exactly the files its list names, which is replaced only
with --overwrite. Anything else is refused before anything is read or written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llm_lifecycle.workflows.runner.stage import UserError, atomic_dir, write_json_atomic

MANIFEST = ".llm-output.json"


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()} - {MANIFEST}


def _listed_files(folder: Path) -> set[str] | None:
    """The files our manifest in `folder` lists; None when there is no readable manifest."""
    try:
        return set(json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_target(out: Path, overwrite: bool, command: str) -> None:
    """Refuse a target holding anything but an earlier output of ours (and that one without --overwrite)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"{command}: --out {out} is a file or a link, not a folder; nothing was written; "
                        "choose a new folder")
    if not out.exists() or not any(out.iterdir()):
        return
    ours = _listed_files(out)
    if ours is None:
        raise UserError(f"{command}: --out {out} is not empty and was not written by {command}; nothing was written; "
                        f"choose a new or empty folder (--overwrite replaces only an earlier {command})")
    foreign = sorted(_files(out) - ours)
    if foreign:
        raise UserError(f"{command}: --out {out} holds files {command} did not write ({', '.join(foreign[:3])}); "
                        "nothing was written; move them away or choose another folder")
    if not overwrite:
        raise UserError(f"{command}: --out {out} holds an earlier {command}; pass --overwrite to replace it")


@contextmanager
def output_folder(out: Path, overwrite: bool, command: str) -> Iterator[Path]:
    """Check `out`, then yield a staging folder that replaces it, with its manifest, when the
    block succeeds. Writers may replace the staging folder whole (their own atomic_dir)."""
    check_target(out, overwrite, command)
    with atomic_dir(out) as staged:
        yield staged
        write_json_atomic(staged / MANIFEST, {"command": command, "files": sorted(_files(staged))})
