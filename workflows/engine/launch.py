"""`--nproc N [--nnodes M --rdzv-endpoint HOST:PORT]`: run the same command under torchrun.

The command re-executes itself as `python -m torch.distributed.run ... -m llm_lifecycle.cli.app
-- <the same arguments>`; inside torchrun (its environment says so) it runs normally, one
process per rank, and the trainer shards the model with FSDP2. The `--` keeps torchrun's
parser off our arguments: it accepts abbreviations, so it would read `--nproc` as an
ambiguous prefix of its own `--nproc-per-node` and stop with its usage text.
"""

from __future__ import annotations

import os
import subprocess
import sys

from llm_lifecycle.workflows.runner.stage import UserError


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def torchrun_command(nproc: int, nnodes: int, rdzv_endpoint: str | None, args: list[str]) -> list[str]:
    if nproc < 1 or nnodes < 1:
        raise UserError(f"--nproc ({nproc}) and --nnodes ({nnodes}) must be at least 1")
    if nnodes > 1 and not rdzv_endpoint:
        raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]
    if rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "llm_lifecycle.cli.app", "--", *args]


def relaunch_if_asked(nproc: int, nnodes: int, rdzv_endpoint: str | None) -> None:
    """Replace this process by a torchrun job when more than one process is asked for."""
    if under_torchrun() or (nproc == 1 and nnodes == 1):
        return
    cmd = torchrun_command(nproc, nnodes, rdzv_endpoint, sys.argv[1:])
    sys.stdout.flush()
    sys.exit(subprocess.run(cmd).returncode)
