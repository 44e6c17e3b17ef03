"""Atomic writes: a file or folder is either complete on disk or absent, even across a kill
or a power cut. Every writer of checkpoints, shards, tokenizers and model folders uses these.

The recipe is the usual one: write to a temporary name in the same directory, fsync the
data, rename over the target (atomic on POSIX), then fsync the directory so the rename
itself survives a crash.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once, at import.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _current_umask()
FILE_MODE = 0o666 & ~UMASK  # what open() would have given: mkstemp/mkdtemp make 0600/0700
DIR_MODE = 0o777 & ~UMASK


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle_tree(root: Path) -> None:
    """Give every file and folder under `root` the user's normal permissions (some writers,
    like mkstemp, make them private) and flush them to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            os.chmod(Path(dirpath) / name, FILE_MODE)
            fsync_path(Path(dirpath) / name)
        os.chmod(dirpath, DIR_MODE)
        fsync_path(Path(dirpath))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        _raise_naming_target(path, err)
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    except Exception as err:
        _raise_naming_target(path, err)
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False), encoding="utf-8")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; on success it replaces `path`,
    on any error it is removed and `path` is left as it was."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        _raise_naming_target(target, err)
        raise
    try:
        yield tmp
        _settle_tree(tmp)
        _replace_dir(tmp, target)
        fsync_path(target.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_naming_target(target, err)
        raise


def _raise_naming_target(target: Path, err: BaseException) -> None:
    """A full disk or a folder we may not write, however the writer reported it (safetensors
    wraps the OS error in its own), becomes an OSError naming the file or folder asked for,
    not our temporary name beside it."""
    code = getattr(err, "errno", None)
    if code not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        code = errno.ENOSPC if "No space left" in str(err) or "StorageFull" in str(err) else None
    if code is not None:
        raise OSError(code, os.strerror(code), str(target)) from err


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`. A directory cannot be renamed over a non-empty one, so the
    old one is first moved aside (one rename), then removed once the new one is in place."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)  # put the old one back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
