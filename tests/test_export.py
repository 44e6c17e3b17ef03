"""`llm export --out` (and `llm import --out`) never delete a user's file: a target that
holds anything but an earlier export is refused with one line (exit 2) and left as it was;
--overwrite replaces only an earlier export; exported files get the user's normal
permissions (issue 22)."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from typer.testing import CliRunner

from llm_lifecycle.cli.app import app
from llm_lifecycle.models.atomic import DIR_MODE, FILE_MODE
from llm_lifecycle.models.checkpoint import save_model_dir
from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder
from llm_lifecycle.registry import tracking
from llm_lifecycle.workflows.data.bpe import train_bpe
from llm_lifecycle.workflows.outputs import MANIFEST


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = train_bpe(["The quick brown fox jumps over the lazy dog. "] * 20, vocab_size=300)
    cfg = ModelConfig(family="llama", vocab_size=tokenizer.get_vocab_size(), dim=32, n_layers=1, n_heads=2,
                      n_kv_heads=1, ffn_dim=64, max_seq_len=64)
    return save_model_dir(tmp_path_factory.mktemp("model") / "tiny", Decoder(cfg), tokenizer)


def export(model_dir, out, *extra):
    return CliRunner().invoke(app, ["export", "--model", str(model_dir), "--out", str(out), *extra])


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_refusal(result, *words):
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output


def test_a_file_is_never_replaced_by_the_export(model_dir, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("my notes\n")
    assert_one_line_refusal(export(model_dir, target, "--overwrite"), "is a file", "nothing was written")
    assert target.read_text() == "my notes\n"


def test_a_folder_with_the_users_files_is_left_alone(model_dir, tmp_path):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.tex").write_text("chapter 1")
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = snapshot(folder)
    for extra in ([], ["--overwrite"]):
        assert_one_line_refusal(export(model_dir, folder, *extra), "not empty", "was not written by llm export")
        assert snapshot(folder) == before


def test_the_workspace_is_never_exported_over(model_dir, workspace):
    tracking.configure(workspace)  # creates mlflow.db in it
    before = snapshot(workspace)
    assert "mlflow.db" in before
    assert_one_line_refusal(export(model_dir, workspace, "--overwrite"), "was not written by llm export")
    assert snapshot(workspace) == before


def test_overwrite_replaces_an_earlier_export_and_nothing_else(model_dir, tmp_path):
    out = tmp_path / "export"
    assert export(model_dir, out, "--format", "safetensors").exit_code == 0
    assert (out / MANIFEST).is_file() and (out / "model.safetensors").is_file()

    assert_one_line_refusal(export(model_dir, out, "--format", "safetensors"), "earlier llm export", "--overwrite")
    result = export(model_dir, out, "--format", "gguf", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "model.safetensors").exists() and (out / "Modelfile").is_file()

    (out / "my-prompt.txt").write_text("keep me")  # the user adds a file to the export folder
    assert_one_line_refusal(export(model_dir, out, "--overwrite"), "did not write", "my-prompt.txt")
    assert (out / "my-prompt.txt").read_text() == "keep me" and (out / "Modelfile").is_file()


@pytest.mark.parametrize("fmt", ["safetensors", "gguf", "hf"])
def test_exported_files_get_the_users_normal_permissions(model_dir, tmp_path, fmt):
    out = tmp_path / "export"
    os.chmod(model_dir / "model.safetensors", 0o600)  # a source file's permissions do not carry over
    result = export(model_dir, out, "--format", fmt)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == DIR_MODE
    for path in out.rglob("*"):
        want = DIR_MODE if path.is_dir() else FILE_MODE
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_import_keeps_to_the_same_rule(model_dir, tmp_path):
    hf = tmp_path / "hf"
    assert export(model_dir, hf, "--format", "hf").exit_code == 0

    def import_(out, *extra):
        return CliRunner().invoke(app, ["import", str(hf), "--out", str(out), *extra])

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("chapter 1")
    assert_one_line_refusal(import_(folder, "--overwrite"), "was not written by llm import")
    assert snapshot(folder) == {"thesis.tex": b"chapter 1"}

    out = tmp_path / "imported"
    assert import_(out).exit_code == 0 and (out / "model.safetensors").is_file()
    assert_one_line_refusal(import_(out), "earlier llm import", "--overwrite")
    assert import_(out, "--overwrite").exit_code == 0
