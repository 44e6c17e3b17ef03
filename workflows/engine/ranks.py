"""The process's place in a torchrun job, read from torchrun's environment.

Kept free of torch imports: the CLI and the tracking code ask "am I rank 0?" before
anything heavy is loaded.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 alone tracks, writes outputs and registers models."""
    return rank() == 0
