"""`llm serve` (a thin wrapper over `mlflow models serve`) answers HTTP requests for a
registered int4 version with the same text the in-process pyfunc model generates."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from conftest import Exploit, free_port, port_frees
from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder
from llm_lifecycle.models.quantize import QuantConfig, quantize_model, save_quantized
from llm_lifecycle.registry import tracking
from llm_lifecycle.workflows.data.bpe import train_bpe

PROMPTS = ["The quick brown fox", "A stitch in time"]


def llm(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llm_lifecycle.cli.app", *args], **kwargs)


@pytest.fixture()
def registered_int4(workspace, tmp_path) -> str:
    tokenizer = train_bpe(["The quick brown fox jumps over the lazy dog. A stitch in time saves nine."] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=tokenizer.get_vocab_size(), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_dim=128, max_seq_len=64))
    quantize_model(model, QuantConfig("rtn", 4, 32))
    model_dir = save_quantized(tmp_path / "int4", model, tokenizer)
    tracking.configure(workspace)
    with tracking.start_run("tiny", "quantize", {"llm.stage": "quantize"}) as tracker:
        tracking.log_and_register_model(tracker, model_dir, "tiny", ["int4"], {"llm.stage": "quantize"})
    return "models:/tiny@int4"


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}: {server.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    raise AssertionError(f"no answer from {url} within {timeout} s")


def model_folder(model_uri: str) -> Path:
    """The registered version's artifact folder in the workspace's store."""
    return Path(urllib.parse.urlparse(mlflow.models.get_model_info(model_uri).artifact_path).path)


def plant_pickles(folder: Path, marker: Path) -> None:
    """Where a tampering hand would put them: beside MLmodel and beside the weights."""
    for path in [folder / "python_model.pkl", *(d / "model.pkl" for d in folder.rglob("*") if d.is_dir())]:
        path.write_bytes(pickle.dumps(Exploit(marker)))


def test_a_registered_model_is_code_and_loads_without_opening_any_pickle(registered_int4, tmp_path):
    folder = model_folder(registered_int4)
    assert not list(folder.rglob("*.pkl"))
    assert "model_code_path" in yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    want = mlflow.pyfunc.load_model(registered_int4).predict(PROMPTS)
    marker = tmp_path / "code-ran"
    plant_pickles(folder, marker)
    assert mlflow.pyfunc.load_model(registered_int4).predict(PROMPTS) == want
    assert not marker.exists(), "a planted pickle was opened"


def test_serve_refuses_a_version_whose_mlmodel_or_code_was_tampered(registered_int4, tmp_path):
    folder, marker = model_folder(registered_int4), tmp_path / "code-ran"
    code = folder / "pyfunc_model.py"
    code.write_text(code.read_text() + f"\nimport os; os.system('touch {marker}')\n")
    result = subprocess.run([sys.executable, "-m", "llm_lifecycle.cli.app", "serve", "--model", registered_int4],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "differs" in result.stderr and "Traceback" not in result.stderr, result.stderr
    plant_pickles(folder, marker)
    original = (folder / "MLmodel").read_text()
    for change in (
        # The form MLflow gives a pickled model: MLmodel names python_model.pkl instead of the code file.
        lambda flavor: (flavor.pop("model_code_path"),
                        flavor.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl")),
        # A logged code folder goes first on sys.path: it could shadow llm_lifecycle itself.
        lambda flavor: flavor.update(code="code"),
    ):
        mlmodel = yaml.safe_load(original)
        change(mlmodel["flavors"]["python_function"])
        (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
        result = subprocess.run([sys.executable, "-m", "llm_lifecycle.cli.app", "serve", "--model", registered_int4],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "not logged as llm-lifecycle code" in result.stderr, result.stderr
    assert not marker.exists(), "the tampered model's code ran"


def test_llm_serve_answers_with_the_registered_models_text(registered_int4, tmp_path):
    want = mlflow.pyfunc.load_model(registered_int4).predict(PROMPTS)
    assert len(want) == 2 and all(isinstance(t, str) and t for t in want)
    marker = tmp_path / "code-ran"
    plant_pickles(model_folder(registered_int4), marker)  # served as it is: they are never opened
    port = free_port()
    server = llm("serve", "--model", registered_int4, "--port", str(port), start_new_session=True,
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server)
        answer = post(f"http://127.0.0.1:{port}/invocations", {"inputs": PROMPTS})
    finally:
        server.send_signal(signal.SIGTERM)  # to `llm serve` alone: it stops mlflow and its workers
        server.wait(timeout=60)
    assert port_frees(port, timeout=30), f"port {port} still served after SIGTERM to llm serve"
    assert answer == {"predictions": want}
    assert not marker.exists(), "a planted pickle was opened"


def test_serving_an_unknown_version_is_one_clear_line(registered_int4):
    result = subprocess.run([sys.executable, "-m", "llm_lifecycle.cli.app", "serve", "--model", "models:/tiny@int3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "int3" in result.stderr and "Traceback" not in result.stderr


def test_a_version_is_logged_with_its_signature_and_without_running_the_model(registered_int4, tmp_path):
    """An input example would make MLflow load the model and generate twice per version
    (signature inference, serving check): the signature is given instead, quietly, and
    predict works."""
    import warnings

    info = mlflow.models.get_model_info(registered_int4)
    assert json.loads(info.signature.to_dict()["inputs"])[0]["type"] == "string"
    assert info.saved_input_example_info is None
    model_dir = tmp_path / "int4"  # the fixture's model folder
    with warnings.catch_warnings(record=True) as caught, tracking.start_run("tiny", "again", {}) as tracker:
        warnings.simplefilter("always")
        tracking.log_and_register_model(tracker, model_dir, "tiny", ["again"], {})
    assert not [w for w in caught if "mlflow" in w.filename], [str(w.message)[:80] for w in caught]
    loaded = mlflow.pyfunc.load_model("models:/tiny@again")
    assert len(loaded.predict(PROMPTS)) == len(PROMPTS)
    # Generation params are declared, so MLflow passes them on instead of dropping them.
    params = {p["name"]: p["default"] for p in json.loads(info.signature.to_dict()["params"])}
    assert params == {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "thinking_budget": 0}
    one_token = loaded.predict(PROMPTS, params={"max_new_tokens": 1})
    lengths = [(len(short), len(full)) for short, full in zip(one_token, loaded.predict(PROMPTS))]
    assert all(short <= full for short, full in lengths) and any(short < full for short, full in lengths)


def test_the_pyfunc_model_class_passes_mlflow_s_type_hint_check():
    """MLflow checks PythonModel.predict's type hints when the class is defined (the first
    import, inside a stage): without them it warns "Add type hints to the `predict` method"."""
    import importlib
    import warnings

    import pandas as pd

    import llm_lifecycle.models.pyfunc as pyfunc

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.reload(pyfunc)  # defines the class again
    assert not [str(w.message) for w in caught if "mlflow" in w.filename]
    assert mlflow.models.signature._extract_type_hints(pyfunc.TextGenerationModel.predict, 1).input is pd.DataFrame
