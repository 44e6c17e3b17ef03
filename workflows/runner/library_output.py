"""While a stage runs, what the libraries it calls write for people (logging records, Python
warnings, MLflow's and lm-eval's notices, tqdm bars) goes to a file in the stage's folder, so
the console shows our progress and results only; the stage ends by saying where that file is."""

from __future__ import annotations

import io
import logging
import sys
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Iterator

from llm_lifecycle.workflows.runner.stage import Progress

FILE_NAME = "third_party.log"


class _FileOnFirstWrite(io.TextIOBase):
    """A text file created when something is first written to it (a quiet stage leaves none),
    and opened again for a write after `close`: a library that kept a reference to it past
    the stage (a thread, a saved sys.stderr) still writes into the stage's file."""

    def __init__(self, path: Path, console):
        self.path, self.console, self._file, self.written = path, console, None, False

    def write(self, text: str) -> int:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self.written = True
        return self._file.write(text)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def isatty(self) -> bool:  # no colour codes, no cursor movement
        return False


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers
            if type(h) is logging.StreamHandler]  # not FileHandler, which subclasses it


def _console(stream):
    """The console behind `stream`: a sink an earlier stage left behind (a library restored
    sys.stderr or a handler to it after that stage ended) stands for the console it replaced."""
    while isinstance(stream, _FileOnFirstWrite):
        stream = stream.console
    return stream


@contextmanager
def library_output_to(directory: Path, progress: Progress) -> Iterator[None]:
    """Send stderr, and the logging handlers that write to it, to `directory`/third_party.log."""
    console = _console(sys.stderr)
    sink = _FileOnFirstWrite(directory / FILE_NAME, console)
    moved = [h for h in _stream_handlers()
             if h.stream in (console, sys.__stderr__) or isinstance(h.stream, _FileOnFirstWrite)]
    originals = [_console(h.stream) for h in moved]
    for handler in moved:
        handler.setStream(sink)
    # Records that reach the root logger (Python warnings among them) go to the file too.
    root_handler = logging.StreamHandler(sink)
    logging.getLogger().addHandler(root_handler)
    logging.captureWarnings(True)
    try:
        with redirect_stderr(sink):
            yield
    finally:
        logging.captureWarnings(False)
        logging.getLogger().removeHandler(root_handler)
        sys.stderr = _console(sys.stderr)
        for handler, stream in zip(moved, originals):
            handler.setStream(stream)
        for handler in _stream_handlers():  # made during the stage by a library imported then
            if isinstance(handler.stream, _FileOnFirstWrite):
                handler.setStream(_console(handler.stream))
        sink.close()
        if sink.written:
            progress.log(f"  [dim]library messages: {sink.path}[/dim]")
