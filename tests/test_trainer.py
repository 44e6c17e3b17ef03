"""The training engine: exact resume after SIGKILL, compile fallback, MoE router losses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import Exploit
from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder
from llm_lifecycle.workflows.trainer import CompiledWithFallback, expert_load_metrics

CHILD = Path(__file__).with_name("train_child.py")


def run_child(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHILD), str(out), *args], capture_output=True, text=True, timeout=600)


def metrics(out: Path) -> dict[int, dict]:
    """step -> that step's logged metrics (a resumed run's later lines win)."""
    lines = (out / "metrics.rank0.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines)}


def test_run_killed_at_step_k_and_resumed_gives_identical_losses(tmp_path):
    common = ("--moe", "--grad-accum", "2", "--steps", "6")
    full = run_child(tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr
    killed = run_child(tmp_path / "resumed", *common, "--kill-at", "3")
    assert killed.returncode == -9  # SIGKILL, after the checkpoint at step 2 and step 2's update
    assert sorted(metrics(tmp_path / "resumed")) == [0, 1, 2]
    resumed = run_child(tmp_path / "resumed", *common)
    assert resumed.returncode == 0, resumed.stderr
    want, got = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    assert sorted(got) == list(range(6))
    for step in range(6):  # bit-identical in float32 on CPU, MoE balance and z-loss included
        for key in ("loss", "lr", "grad_norm", "aux_loss", "moe.layer1.max_load"):
            assert got[step][key] == want[step][key], (step, key)
    final_full = torch.load(tmp_path / "full" / "final.pt")
    final_resumed = torch.load(tmp_path / "resumed" / "final.pt")
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)


def test_compile_falls_back_to_eager_when_the_first_call_fails(monkeypatch):
    import torch._inductor.config as inductor_config

    # A real Inductor failure: no working C++ compiler for the fused elementwise kernel.
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    logged: list[str] = []
    wrapped = CompiledWithFallback(model, logged.append)
    x = torch.randn(2, 4)
    assert torch.equal(wrapped(x), model(x))
    assert wrapped.compiled is None and "training eagerly" in logged[0]
    assert wrapped._modules is model._modules  # attribute access reaches the model


MOE = dict(family="qwen3_moe", vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True,
           tie_embeddings=False, n_experts=4, n_experts_per_token=2, moe_ffn_dim=16, max_seq_len=32)


def moe_model(**overrides) -> Decoder:
    torch.manual_seed(0)
    return Decoder(ModelConfig(**{**MOE, **overrides})).train()


def test_router_z_loss_and_expert_load_metrics():
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    plain, with_z = moe_model()(ids), moe_model(router_z_loss_coef=1e-2)(ids)
    assert with_z.aux_loss > plain.aux_loss  # logsumexp^2 > 0 adds to the loss
    assert plain.expert_load.shape == (2, 4) and int(plain.expert_load.sum()) == 2 * 18 * 2
    m = expert_load_metrics(plain.expert_load)
    assert set(m) == {f"moe.layer{i}.{k}_load" for i in range(2) for k in ("max", "min")}
    assert m["moe.layer0.max_load"] >= 1.0 >= m["moe.layer0.min_load"]


def test_global_batch_balance_counts_every_micro_batch_of_the_step():
    model = moe_model(moe_balance="global_batch")
    a, b = torch.randint(0, 97, (2, 2, 9), generator=torch.Generator().manual_seed(1))
    model.begin_global_batch()
    load_a = model(a).expert_load
    model(b)
    load_b = model(b).expert_load
    assert torch.equal(model._batch_counts, (load_a + 2 * load_b).float())
    model.begin_global_batch()
    model(a)
    assert torch.equal(model._batch_counts, load_a.float())


@pytest.mark.parametrize("fields", [dict(MOE), dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)])
def test_activation_checkpointing_gives_the_same_gradients(fields):
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = Decoder(ModelConfig(**fields)).train()
        model.activation_checkpointing = recompute
        out = model(ids)
        (out.logits.square().mean() + out.aux_loss).backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# ---------------------------------------------------------------------------------------
# Checkpoints verify against the checksum written with them (issue 22).


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert run_child(out, "--steps", "6").returncode == 0
    return torch.load(out / "final.pt")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_weight_byte(path: Path) -> None:
    """Change one byte of tensor data: the file still loads, with a wrong weight."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_weight_byte], ids=["truncated", "changed"])
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(tmp_path, uninterrupted,
                                                                                        damage):
    killed = run_child(tmp_path, "--steps", "6", "--kill-at", "5")
    assert killed.returncode == -9
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "step-00000002.pt", "step-00000002.pt.sha256", "step-00000004.pt", "step-00000004.pt.sha256"]
    damage(ckpts / "step-00000004.pt")
    resumed = run_child(tmp_path, "--steps", "6")
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint {ckpts / 'step-00000004.pt'} is damaged" in resumed.stdout, resumed.stdout
    assert "resuming training from step 2 (step-00000002.pt)" in resumed.stdout, resumed.stdout
    final = torch.load(tmp_path / "final.pt")
    assert all(torch.equal(final[k], uninterrupted[k]) for k in uninterrupted)


def test_corruption_is_told_apart_from_a_refused_pickle(tmp_path):
    from llm_lifecycle.workflows.stage import UserError
    from llm_lifecycle.workflows.trainer import DamagedCheckpoint, read_checkpoint

    marker = tmp_path / "code-ran"
    hostile = tmp_path / "step-00000003.pt"
    torch.save({"step": 3, "model": Exploit(marker)}, hostile)
    with pytest.raises(UserError, match="refused to load checkpoint .* it was not executed"):
        read_checkpoint(hostile)
    assert not marker.exists()

    truncated = tmp_path / "step-00000004.pt"  # from before checksums: torch's zip reader finds the damage
    torch.save({"step": 4, "model": {"w": torch.ones(1000)}}, truncated)
    _truncate(truncated)
    with pytest.raises(DamagedCheckpoint, match="central directory|failed"):
        read_checkpoint(truncated)
