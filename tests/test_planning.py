"""The memory planner against measured memory: a real training step's peak (tracked by
torch's MemTracker) and a real KV cache."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder, dual_chunk_attention
from llm_lifecycle.models.presets import load_preset
from llm_lifecycle.workflows.engine.memory import DCA_QUERY_BLOCK, inference_memory, training_memory
from llm_lifecycle.workflows.runner.planning import parse_params, shape_for_params, shape_of
from llm_lifecycle.workflows.engine.trainer import lm_loss


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


@pytest.mark.parametrize("preset", ["llama-small", "qwen3-moe-small", "phi3-small-small"])
def test_training_estimate_within_15_percent_of_measured_peak(preset):
    cfg = ModelConfig.from_dict(load_preset(preset))
    measured = measured_training_peak(cfg, batch=4, seq=256)
    estimate = training_memory(shape_of(cfg), 4, 256, "fp32")["total"]
    assert abs(estimate - measured) / measured < 0.15, (estimate / 2**20, measured / 2**20)


def test_block_sparse_plan_counts_the_mask_and_the_masked_scores():
    """Phi-3-small's block sparsity runs as a masked attention: at 1024 tokens the scores its
    two block-sparse layers keep for backward are a third of the step's peak, and counted."""
    fields = {**load_preset("phi3-small-small"), "max_seq_len": 1024}
    cfg = ModelConfig.from_dict(fields)
    measured = measured_training_peak(cfg, batch=4, seq=1024)
    estimate = training_memory(shape_of(cfg), 4, 1024, "fp32")
    assert abs(estimate["total"] - measured) / measured < 0.15, (estimate["total"] / 2**20, measured / 2**20)
    dense = training_memory(shape_of(ModelConfig.from_dict({**fields, "blocksparse_block_size": None})), 4, 1024, "fp32")
    assert estimate["total"] - dense["total"] == 8 * 1024**2 + 2 * 4 * 8 * 1024**2 * 4  # the Bool mask + 2 layers' scores
    assert abs(dense["total"] - measured) / measured > 0.3  # uncounted, the plan would miss them


def test_dual_chunk_attentions_scores_are_planned():
    """DCA computes T x T scores itself (no fused kernel): the plan counts them; without them
    it was 250.6 MiB against a measured 480.4."""
    cfg = ModelConfig.from_dict({**load_preset("llama-small"), "max_seq_len": 1024, "dca_chunk": 64,
                                 "dca_local_window": 16})
    measured = measured_training_peak(cfg, batch=4, seq=512)
    estimate = training_memory(shape_of(cfg), 4, 512, "fp32")["total"]
    assert abs(estimate - measured) / measured < 0.15, (estimate / 2**20, measured / 2**20)
    # The planner's query block is the one the model computes its scores in (it cannot import torch code).
    assert inspect.signature(dual_chunk_attention).parameters["block"].default == DCA_QUERY_BLOCK


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


def test_deepseek_v2_small_generates_the_same_tokens_from_a_cache_16x_below_the_expanded_one():
    """The latent cache generate() allocates, against expanded keys and values per head (what
    the cache held before; benches/mla_cache_memory.py measures that code at 4k context)."""
    from llm_lifecycle.models.generate import generate

    cfg = ModelConfig.from_dict(load_preset("deepseek-v2-small"))
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    with torch.no_grad():  # wide weights: clear argmax margins
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.08)
    prompt, new = torch.randint(0, cfg.vocab_size, (192,), generator=torch.Generator().manual_seed(1)).tolist(), 8
    ids = list(prompt)
    with torch.no_grad():  # no cache: every step the whole sequence in the expanded form
        for _ in range(new):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert generate(model, [prompt], new) == [ids[len(prompt):]]
    length = len(prompt) + new - 1  # what generate() caches
    latent = model.new_static_kv_cache(1, length).nbytes
    expanded = cfg.n_layers * length * cfg.n_heads * (cfg.head_dim + cfg.v_head_dim) * 4  # fp32 keys + values
    assert expanded / latent == 16  # 16 heads x (48 + 32) / (64 + 16)
    assert inference_memory(shape_of(cfg), 1, length, "fp32")["kv_cache"] == latent


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


def test_lora_and_qlora_keep_the_base_frozen_and_small():
    from llm_lifecycle.models.lora import apply_lora
    from llm_lifecycle.workflows.engine.memory import NF4_BYTES, lora_params, lora_training_memory

    for preset in ("llama-small", "qwen3-moe-small", "phi-small"):  # dense, MoE (experts unadapted), plain MLP
        cfg = ModelConfig.from_dict(load_preset(preset))
        adapters = sum(p.numel() for _, p in apply_lora(Decoder(cfg), 16, 32.0))
        assert lora_params(shape_of(cfg), 16) == adapters, preset
    shape = shape_for_params(7e9)
    full = training_memory(shape, 1, 2048, "bf16", recompute=True)
    lora = lora_training_memory(shape, 1, 2048, 16, quantized=False, recompute=True)
    qlora = lora_training_memory(shape, 1, 2048, 16, quantized=True, recompute=True)
    assert lora["optimizer"] == 8 * lora["adapter_params"] < 0.01 * full["optimizer"]  # moments of the adapters only
    assert qlora["total"] < lora["total"] < full["total"] / 5
    embed_head = 2 * shape.vocab_size * shape.dim  # QLoRA keeps these in bf16
    assert lora["weights"] - qlora["weights"] == pytest.approx((shape.params - embed_head) * (2 - NF4_BYTES))
    # the QLoRA paper's headline: a 65B model fine-tunes on one 48 GB GPU
    assert lora_training_memory(shape_for_params(65e9), 1, 512, 64, quantized=True, recompute=True)["total"] < 48e9


def test_activation_checkpointing_keeps_each_layers_input_and_one_layer():
    cfg = ModelConfig.from_dict(load_preset("llama3-8b"))
    shape = shape_of(cfg)
    plain, kept = training_memory(shape, 1, 8192, "bf16"), training_memory(shape, 1, 8192, "bf16", recompute=True)
    assert kept["activations"] < plain["activations"] / 10
    assert kept["activations"] > 8192 * cfg.n_layers * cfg.dim * 2  # every layer's input stays


def test_gpus_needed_shards_training_and_splits_inference():
    from llm_lifecycle.workflows.engine.memory import GPU_RESERVED_BYTES, gpus_needed

    gib = 2**30
    train = {"weights": 100 * gib, "optimizer": 200 * gib, "grads": 100 * gib, "activations": 30 * gib, "loss": 2 * gib}
    # each 80 GiB GPU gives 80 - 2 reserved - 32 of its own activations = 46 GiB to the 400 GiB of shards
    assert GPU_RESERVED_BYTES == 2 * gib and gpus_needed(train, 80 * gib) == 9
    assert gpus_needed(dict(train, activations=79 * gib), 80 * gib) is None  # one batch alone is too big
    assert gpus_needed({"total": 140e9}, 80 * gib) == 2  # a 70B model's fp16 weights over 78 GiB GPUs


def test_training_time_matches_llama_7b_gpu_hours():
    """LLaMA-7B: 1T tokens in 82,432 A100-80GB GPU-hours (the LLaMA paper, table 15); with the
    6N + attention FLOPs that is about 47% MFU on 312 TFLOP/s."""
    from llm_lifecycle.workflows.engine.memory import training_days
    from llm_lifecycle.workflows.runner.planning import dense_flops_per_token, gpu_spec

    cfg = ModelConfig.from_dict({**load_preset("llama2-7b"), "max_seq_len": 2048})  # LLaMA-7B's shape
    flops = cfg.flops_per_token(2048)
    memory, peak = gpu_spec("A100")
    assert memory == 80 * 2**30 and peak == 312e12
    gpu_hours = training_days(flops, 1e12, 2048, peak, 0.47) * 24 * 2048
    assert gpu_hours == pytest.approx(82_432, rel=0.05)
    assert dense_flops_per_token(shape_for_params(6.74e9), 2048) == pytest.approx(flops, rel=0.02)


def test_plan_cli_sizes_gpus_and_time_and_rejects_a_time_without_a_gpu():
    run = [sys.executable, "-m", "llm_lifecycle.cli.app", "plan"]
    env = {**__import__("os").environ, "COLUMNS": "200"}
    ok = subprocess.run([*run, "llama2-7b", "--gpu", "H100", "--tokens", "2T"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "QLoRA r16" in ok.stdout and "H100 (80 GiB)" in ok.stdout and "GPU-hours" in ok.stdout
    for bad in (["llama2-7b", "--tokens", "2T"], ["llama2-7b", "--gpu", "X100"], ["--params", "7B", "--gpu", "H100",
                                                                                 "--tokens", "lots"]):
        out = subprocess.run([*run, *bad], capture_output=True, text=True, env=env)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, (bad, out.stderr)
