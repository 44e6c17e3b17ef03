"""Native bf16 on CPU: the instruction sets are detected and recorded, `precision: auto`
follows them, and the model's bf16 path (attention in fp32 on CPU, experts in bf16) trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder, attention
from llm_lifecycle.registry.hardware import cpu_flags, hardware_profile, native_bf16_isa, parse_cpu_flags
from llm_lifecycle.workflows.engine.trainer import autocast_dtype, resolve_precision

ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8\n"
SKYLAKE = "processor\t: 0\nflags\t\t: sse4_2 avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: sse4_2 avx2 avx512f\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, isa", [(ZEN4, "avx512_bf16"), (SAPPHIRE_RAPIDS, "amx_bf16"), (SKYLAKE, None),
                                          (GRAVITON, None), ("", None)])
def test_native_bf16_is_amx_or_avx512_bf16(cpuinfo, isa):
    assert native_bf16_isa(parse_cpu_flags(cpuinfo)) == isa


def test_hardware_tags_name_this_cpus_instruction_sets():
    tags = hardware_profile()
    flags = cpu_flags()
    listed = set(tags["hw.cpu_isa"].split(",")) - {"none"}
    assert listed <= flags and ("avx2" in listed) == ("avx2" in flags)
    assert tags["hw.cpu_native_bf16"] == (native_bf16_isa(flags) or "none")
    assert tags["hw.torch_cpu_kernels"]


def test_auto_precision_is_bf16_exactly_where_the_cpu_has_it():
    native = native_bf16_isa(cpu_flags()) is not None
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert autocast_dtype("auto", "cpu") == (torch.bfloat16 if native else None)
    assert autocast_dtype("fp32", "cpu") is None  # the recipe setting that turns it off
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16


def test_cpu_attention_under_bf16_runs_in_fp32_and_returns_bf16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, None)
    assert out.dtype == torch.bfloat16
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).bfloat16()
    assert torch.equal(out, want)


TINY_MOE = ModelConfig(family="qwen3_moe", vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       qk_norm=True, tie_embeddings=False, n_experts=4, n_experts_per_token=2, moe_ffn_dim=32,
                       max_seq_len=32)


def test_bf16_autocast_step_keeps_fp32_weights_and_tracks_the_fp32_loss():
    torch.manual_seed(0)
    model = Decoder(TINY_MOE)
    ids = torch.randint(0, 128, (4, 33))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    fp32 = model(inputs, targets=targets).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(inputs, targets=targets)
    (out.loss + out.aux_loss).backward()
    assert abs(out.loss.item() - fp32.item()) / fp32.item() < 0.01
    experts = model.layers[0].ffn
    assert experts.w_gate.dtype == torch.float32 and experts.w_gate.grad.dtype == torch.float32
    assert experts.w_gate.grad.abs().sum() > 0  # the bf16 grouped matmul passes gradients to the fp32 weights


def test_experts_run_in_the_autocast_dtype():
    torch.manual_seed(0)
    moe = Decoder(TINY_MOE).layers[0].ffn
    x = torch.randn(16, 64)
    counts = torch.tensor([4, 4, 4, 4])
    experts = torch.arange(4).repeat_interleave(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe._run_experts(x, experts, counts).dtype == torch.bfloat16
    assert moe._run_experts(x, experts, counts).dtype == torch.float32
