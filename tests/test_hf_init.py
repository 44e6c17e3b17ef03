"""Starting from a Hugging Face checkpoint: `llm import`, and `--init` on the pipeline's SFT."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from conftest import TINY_OVERRIDES
from test_cli import llm


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random Qwen2 checkpoint whose tokenizer (like Llama 3's) lacks our ChatML tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("hf") / "tiny-qwen2"
    config = transformers.Qwen2Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
    vocab = {"<|endoftext|>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    vocab.update({f"w{i}": len(vocab) + i for i in range(300 - len(vocab))})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_llm_import_adds_chat_tokens_and_keeps_the_logits(hf_folder, tmp_path, workspace):
    from llm_lifecycle.models.checkpoint import load_model_dir

    out = llm("import", str(hf_folder), "--out", str(tmp_path / "ours"))
    assert out.returncode == 0, out.stderr
    assert "qwen2" in out.stdout
    ours, tokenizer = load_model_dir(tmp_path / "ours")
    assert [tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>")] == [300, 301]
    assert ours.cfg.vocab_size == 302
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32).eval()
    x = torch.randint(1, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x).logits[..., :300] - theirs(x).logits).abs().max() < 1e-4


def test_import_from_the_hub_offline_is_one_line(tmp_path, workspace):
    out = llm("import", "nobody-here/no-such-model", "--out", str(tmp_path / "x"), env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "cannot reach the Hugging Face hub to fetch nobody-here/no-such-model" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_sft_init_fine_tunes_the_imported_model_with_no_earlier_stage(hf_folder, workspace):
    sets = [arg for o in TINY_OVERRIDES if o.startswith("sft.") for arg in ("--set", o)]
    out = llm("sft", "--recipe", "llama-small", "--init", str(hf_folder), *sets, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (sft_dir,) = (workspace / "llama-small" / "sft").iterdir()
    config = json.loads((sft_dir / "model" / "config.json").read_text())
    assert config["model"]["family"] == "qwen2" and config["model"]["vocab_size"] == 302
    assert json.loads((sft_dir / "result.json").read_text())["result"]["metrics"]["examples"] > 0


@pytest.mark.slow
def test_pipeline_init_starts_at_sft_from_the_imported_model(hf_folder, workspace):
    sets = [arg for o in TINY_OVERRIDES for arg in ("--set", o)]
    out = llm("pipeline", "llama-small", "--init", str(hf_folder), "--stages", "data-fetch,data-clean,tokenizer-train,sft",
              *sets, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = workspace / "llama-small"
    assert not (runs / "pretrain").exists() and not (runs / "extend-context").exists()
    (sft_dir,) = (runs / "sft").iterdir()
    config = json.loads((sft_dir / "model" / "config.json").read_text())
    assert config["model"]["family"] == "qwen2" and config["model"]["vocab_size"] == 302
    (tok_dir,) = (runs / "tokenizer-train").iterdir()
    assert json.loads((tok_dir / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"
