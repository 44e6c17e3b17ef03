"""The stage contract's `Progress` for the terminal: Rich bars on a TTY, plain lines elsewhere
(a log file, CI, nohup), where a bar would print nothing until it ends."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.markup import escape
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

    def update(self, *, total: float | None = None, description: str | None = None, info: str | None = None) -> None:
        kwargs = {k: v for k, v in {"total": total, "description": description, "info": info}.items() if v is not None}
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
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
            redirect_stderr=False,  # stderr is the libraries' and goes to the stage's log file
        ) as bars:
            yield _Task(bars, bars.add_task(description, total=total, info=""))

    def log(self, message: str) -> None:
        self.console.print(message)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class _PlainTask:
    """Counts steps and prints one line every `every_s` seconds and when the task ends:
    description, step/total, the latest info (loss, tokens/s), ETA or time taken. The rate
    counts every step since the task began (a resumed task's skipped steps too)."""

    def __init__(self, console: Console, description: str, total: float | None, every_s: float):
        self.console, self.description, self.total, self.every_s = console, description, total, every_s
        self.done, self.info = 0.0, ""
        self.started = self.last_line = time.monotonic()

    def advance(self, n: float = 1) -> None:
        self.done += n
        if time.monotonic() - self.last_line >= self.every_s and self.done != self.total:  # the end has its own line
            self.print_line()

    def update(self, *, total: float | None = None, description: str | None = None, info: str | None = None) -> None:
        self.total = total if total is not None else self.total
        self.description = description or self.description
        self.info = info if info is not None else self.info

    def print_line(self, final: bool = False) -> None:
        self.last_line = now = time.monotonic()
        elapsed = now - self.started
        parts = [f"{self.done:.0f}/{self.total:.0f}" if self.total else f"{self.done:.0f}"] if self.done else []
        parts += [self.info] if self.info else []
        if final:
            parts.append(f"took {_duration(elapsed)}")
        elif self.total and self.done > 0:
            parts.append(f"ETA {_duration(elapsed / self.done * (self.total - self.done))}")
        self.console.print(f"  {escape(self.description)}: {', '.join(parts)}", highlight=False, soft_wrap=True)


class PlainProgress:
    """Progress for a console that is not a terminal: a plain line every ~`every_s` seconds
    and when each task ends (no bars, no cursor movement, no colour codes)."""

    def __init__(self, console: Console, every_s: float = 10.0):
        self.console, self.every_s = console, every_s

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[_PlainTask]:
        task = _PlainTask(self.console, description, total, self.every_s)
        yield task
        task.print_line(final=True)

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)


def console_progress(console: Console) -> RichProgress | PlainProgress:
    """Bars where someone watches a terminal, plain lines where output goes to a file."""
    return RichProgress(console) if console.is_terminal else PlainProgress(console)
