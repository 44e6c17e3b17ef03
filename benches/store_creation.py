"""What opening a new workspace's MLflow store costs: MLflow creating the sqlite store itself
(its schema migrations) against our copy of the empty, migrated store made once per MLflow
version (registry/tracking.py `_copy_empty_store`).

    python benches/store_creation.py [--rounds 3]

Both ways alternate, each in a fresh process and folder (as `llm pipeline` on an empty
workspace meets them: MLflow's migration scripts are imported only when a store is made);
wall seconds of the whole process, mlflow's import included in both.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


MLFLOW_MAKES_IT = """
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}/mlflow.db")
client.search_experiments(max_results=1)
client.search_registered_models(max_results=1)
"""
WE_COPY_IT = """
import sys
from pathlib import Path
from llm_lifecycle.registry import tracking
tracking.configure(Path(sys.argv[1]))
"""


def _wall_seconds(code: str, folder: Path) -> float:
    folder.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    root = Path(tempfile.mkdtemp(prefix="store-creation-"))
    _wall_seconds(WE_COPY_IT, root / "warm-up")  # makes the template if this machine has none yet
    ways = {"MLflow creates it (migrations)": MLFLOW_MAKES_IT, "copy of the migrated template (ours)": WE_COPY_IT}
    for n in range(args.rounds):
        for i, (name, code) in enumerate(ways.items()):
            print(f"round {n + 1}  {name:38s} {_wall_seconds(code, root / f'{n}-{i}'):6.2f} s wall")


if __name__ == "__main__":
    main()
