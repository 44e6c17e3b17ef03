"""Rich progress bars for the terminal; the stage contract's `Progress`."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Task:
    def __init__(self, bars: Progress, task_id):
        self._bars, self._id = bars, task_id

    def advance(self, n: float = 1) -> None:
        self._bars.advance(self._id, n)

    def update(self, *, total: float | None = None, description: str | None = None) -> None:
        kwargs = {k: v for k, v in {"total": total, "description": description}.items() if v is not None}
        self._bars.update(self._id, **kwargs)


class RichProgress:
    def __init__(self, console: Console):
        self.console = console

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[_Task]:
        with Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        ) as bars:
            yield _Task(bars, bars.add_task(description, total=total))

    def log(self, message: str) -> None:
        self.console.print(message)
