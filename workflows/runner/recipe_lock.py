"""One `llm` process at a time runs a recipe on a workspace.

Two processes running one recipe would race for its stage folders, its registered model's
aliases and its MLflow experiment; the second is refused before it opens any run, or, with
`--wait`, queues behind the first. The lock is an flock on `<workspace>/<recipe>/.lock`: the
OS drops it when its holder dies, even by SIGKILL, so a killed run never blocks the next.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llm_lifecycle.workflows.engine.ranks import is_main_process
from llm_lifecycle.workflows.runner.stage import Progress, UserError

# Recipe locks this process holds: a sweep holds its recipe while each variant's pipeline runs.
_HELD: set[Path] = set()


@contextmanager
def hold_recipe(workspace: Path, recipe_name: str, wait: bool, progress: Progress) -> Iterator[None]:
    """Hold the recipe's lock for the block; refuse (UserError) if another process holds it,
    or wait for it when `wait`. Under torchrun rank 0 holds it for the job."""
    path = (workspace / recipe_name / ".lock").absolute()
    if path in _HELD or not is_main_process():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(lock)
            if not wait:
                raise UserError(
                    f"recipe {recipe_name} is being run by another llm process ({holder}) on the workspace "
                    f"{workspace}; pass --wait to queue behind it, or set another LLM_HOME"
                ) from None
            progress.log(f"[yellow]waiting for another llm process ({holder}) running recipe {recipe_name}[/yellow]")
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        _HELD.add(path)
        try:
            yield
        finally:
            _HELD.discard(path)


def _holder(lock) -> str:
    lock.seek(0)
    pid = lock.read().strip()
    return f"pid {pid}" if pid.isdigit() else "pid unknown"
