"""What logging one model version costs: `mlflow.pyfunc.log_model` of a qwen3-moe-small-sized
model with an input example (MLflow then loads the model and generates twice: signature
inference and a serving check) against the explicit signature registry/tracking.py gives.

    python benches/model_logging.py [--rounds 3]

Both ways alternate in one process, in a throwaway sqlite store; CPU seconds of the process
and wall seconds per version are printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="model-logging-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
    import mlflow
    from mlflow.models import infer_signature

    from llm_lifecycle.models.checkpoint import save_model_dir
    from llm_lifecycle.models.config import ModelConfig
    from llm_lifecycle.models.decoder import Decoder
    from llm_lifecycle.models.presets import load_preset
    from llm_lifecycle.registry.tracking import PYFUNC_CODE
    from llm_lifecycle.workflows.tokenizer import train_bpe

    cfg = ModelConfig(**load_preset("qwen3-moe-small"))
    tokenizer = train_bpe(["Once upon a time there was a model that learned to write."] * 50, vocab_size=cfg.vocab_size)
    model_dir = save_model_dir(Path(home) / "model", Decoder(cfg), tokenizer)
    ways = {"input example (before)": {"input_example": ["Once upon a time"]},
            "signature (now)": {"signature": infer_signature(["Once upon a time"], ["a continuation"])}}
    mlflow.set_experiment("model-logging")
    for _ in range(args.rounds):
        for way, how in ways.items():
            with mlflow.start_run():
                cpu, wall = time.process_time(), time.perf_counter()
                mlflow.pyfunc.log_model(name="model", python_model=importlib.util.find_spec(PYFUNC_CODE).origin,
                                        artifacts={"model_dir": str(model_dir)}, pip_requirements=["llm-lifecycle"],
                                        registered_model_name="bench", **how)
                print(f"{way}: {time.process_time() - cpu:.2f} CPU s, {time.perf_counter() - wall:.2f} wall s", flush=True)


if __name__ == "__main__":
    main()
