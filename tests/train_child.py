"""A tiny real training run for tests/test_trainer.py and tests/test_distributed.py.

    python tests/train_child.py OUT_DIR [--kill-at STEP] [--moe] [--grad-accum N] [--steps N]

Trains a small decoder on synthetic tokens (a pure function of the micro-step index) with
workflows/engine/trainer.py train(), appending each step's metrics to OUT_DIR/metrics.rank{R}.jsonl as it
goes; --kill-at STEP SIGKILLs the process when step STEP asks for its data. Runs the same
under torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder
from llm_lifecycle.workflows.engine.ranks import rank
from llm_lifecycle.workflows.runner.stage import SilentProgress, StageContext
from llm_lifecycle.workflows.engine.trainer import TrainSettings, lm_loss, train

VOCAB, SEQ = 64, 16


class PrintedProgress(SilentProgress):
    """No bars; log lines (resuming, a damaged checkpoint skipped) go to stdout."""

    def log(self, message: str) -> None:
        print(message, flush=True)


class JsonlTracker:
    """Writes each metrics call as one flushed line, so the lines survive a SIGKILL."""

    def __init__(self, path: Path):
        self.file = path.open("a")

    def log_metrics(self, metrics, step=None):
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def set_tags(self, tags):
        pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--moe", action="store_true")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    torch.manual_seed(0)
    moe = dict(family="qwen3_moe", qk_norm=True, tie_embeddings=False, n_experts=4, n_experts_per_token=2,
               moe_ffn_dim=16, router_z_loss_coef=1e-3, moe_balance="global_batch") if args.moe else {}
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=SEQ, **moe)
    model = Decoder(cfg)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=SEQ, grad_accum=args.grad_accum,
                             lr=3e-3, warmup_steps=2, checkpoint_every=2, log_every=1, precision="fp32")

    def batches(start: int):
        micro = start
        while True:
            if micro == args.kill_at * args.grad_accum:
                os.kill(os.getpid(), signal.SIGKILL)
            # Token t+1 depends on token t, so there is something to learn.
            g = torch.Generator().manual_seed(micro)
            first = torch.randint(0, VOCAB, (settings.batch_size, 1), generator=g)
            steps = torch.randint(1, 3, (settings.batch_size, SEQ), generator=g)
            seq = torch.cat((first, first + steps.cumsum(1)), dim=1) % VOCAB
            yield seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
            micro += 1

    args.out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(stage="pretrain", kind="pretrain", recipe=None, workspace=args.out, stage_dir=args.out,
                       inputs={}, sources={}, values={},
                       tracker=JsonlTracker(args.out / f"metrics.rank{rank()}.jsonl"), progress=PrintedProgress())
    train(ctx, model, settings, batches, lm_loss, args.out / "checkpoints",
          flops_per_token=cfg.flops_per_token(SEQ))
    if rank() == 0:
        torch.save(model.state_dict(), args.out / "final.pt")


if __name__ == "__main__":
    sys.exit(main())
