"""The memory planner against measured memory: a real training step's peak (tracked by
torch's MemTracker) and a real KV cache."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder
from llm_lifecycle.models.presets import load_preset
from llm_lifecycle.registry.memory import inference_memory, training_memory
from llm_lifecycle.workflows.planning import parse_params, shape_for_params, shape_of
from llm_lifecycle.workflows.trainer import lm_loss


def measured_training_peak(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Peak bytes of one fp32 AdamW step after a warm-up step (so the moments exist)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    model = Decoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    data = (ids[:, :-1], ids[:, 1:])

    def step():
        loss, _ = lm_loss(model, data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("preset", ["llama-small", "qwen3-moe-small"])
def test_training_estimate_within_15_percent_of_measured_peak(preset):
    cfg = ModelConfig.from_dict(load_preset(preset))
    measured = measured_training_peak(cfg, batch=4, seq=256)
    estimate = training_memory(shape_of(cfg), 4, 256, "fp32")["total"]
    assert abs(estimate - measured) / measured < 0.15, (estimate / 2**20, measured / 2**20)


@pytest.mark.parametrize("preset", ["qwen3-moe-small", "deepseek-v2-small"])
def test_kv_cache_estimate_equals_the_real_cache(preset):
    cfg = ModelConfig.from_dict(load_preset(preset))
    model = Decoder(cfg).eval()
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, 40)), kv_cache=cache)
    real = sum(t.nbytes for t in cache.keys + cache.values)
    assert inference_memory(shape_of(cfg), 2, 40, "fp32")["kv_cache"] == real
    assert model.new_static_kv_cache(3, 50).nbytes == inference_memory(shape_of(cfg), 3, 50, "fp32")["kv_cache"]


def test_mla_plan_counts_the_latent_cache():
    cfg = ModelConfig.from_dict(load_preset("deepseek-v2"))
    mem = inference_memory(shape_of(cfg), 1, 32768, "fp16")
    # 60 layers * (512 latent + 64 RoPE key) * 32768 tokens * 2 bytes, not 60 * 128 heads * (192 + 128) * ...
    assert mem["kv_cache"] == 60 * 576 * 32768 * 2
    assert 2.0 < mem["kv_cache"] / 2**30 < 2.2


def test_published_size_breakdown_adds_up():
    cfg = ModelConfig.from_dict(load_preset("llama3-8b"))
    mem = inference_memory(shape_of(cfg), 1, 8192, "bf16")
    assert mem["kv_cache"] == 2**30  # 2 (k, v) * 32 layers * 8 kv heads * 128 * 8192 tokens * 2 bytes
    assert mem["weights"] == 2 * cfg.num_params()
    train = training_memory(shape_of(cfg), 1, 8192, "bf16")
    assert training_memory(shape_of(cfg), 2, 8192, "bf16")["activations"] - train["activations"] == pytest.approx(
        train["activations"] - training_memory(shape_of(cfg), 0, 8192, "bf16")["activations"])


def test_params_give_a_llama_shape_and_the_published_7b_inference_size():
    assert parse_params("7B") == 7e9 and parse_params("500m") == 5e8
    shape = shape_for_params(7e9)
    assert (shape.dim, shape.n_layers) == (4096, 32)  # LLaMA 7B's width and depth
    fp16 = inference_memory(shape, 1, 2048, "fp16")["total"] / 1e9
    assert 10 <= fp16 <= 16  # the reports' tables: about 10-14 GB in FP16 for 7B
    assert inference_memory(shape, 1, 2048, "int4")["total"] < inference_memory(shape, 1, 2048, "int8")["total"] < fp16 * 1e9


def test_plan_cli_prints_a_table_and_rejects_no_model():
    run = [sys.executable, "-m", "llm_lifecycle.cli.app", "plan"]
    ok = subprocess.run([*run, "--params", "7B"], capture_output=True, text=True)
    assert ok.returncode == 0 and "int4" in ok.stdout and "GiB" in ok.stdout
    bad = subprocess.run(run, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
