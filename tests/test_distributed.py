"""Two processes under torchrun (gloo, FSDP2 on CPU) follow the loss curve of one process
with the same global batch."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch

from llm_lifecycle.workflows.engine.launch import torchrun_command

CHILD = Path(__file__).with_name("train_child.py")
ARGS = ("--moe", "--grad-accum", "2", "--steps", "4", "--batch-size", "4")


def losses(out: Path, rank: int = 0) -> list[float]:
    rows = [json.loads(line) for line in (out / f"metrics.rank{rank}.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process(tmp_path):
    one = subprocess.run([sys.executable, str(CHILD), str(tmp_path / "one"), *ARGS],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           str(CHILD), str(tmp_path / "two"), *ARGS]
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    single, sharded = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(single) == len(sharded) == 4
    assert max(abs(a - b) for a, b in zip(single, sharded)) < 1e-5, (single, sharded)
    assert losses(tmp_path / "two", rank=1) == sharded  # every rank logs the all-reduced loss
    assert single[-1] < single[0]
    # Rank 0 wrote the gathered (unsharded) final weights, equal to the single process's.
    a, b = torch.load(tmp_path / "one" / "final.pt"), torch.load(tmp_path / "two" / "final.pt")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_torchrun_command_for_the_cli():
    cmd = torchrun_command(2, 1, None, ["pretrain", "-r", "llama-small", "--nproc", "2"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=2"] and "--standalone" in cmd
    # `--`: torchrun's parser (which takes abbreviations) must not read --nproc as its --nproc-per-node
    assert cmd[-8:] == ["-m", "llm_lifecycle.cli.app", "--", "pretrain", "-r", "llama-small", "--nproc", "2"]
    multi = torchrun_command(4, 2, "node0:29500", ["sft", "-r", "x"])
    assert "--rdzv-endpoint=node0:29500" in multi and "--nnodes=2" in multi
