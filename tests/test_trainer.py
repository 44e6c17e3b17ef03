"""The training engine: exact resume after SIGKILL, compile fallback, MoE router losses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import Exploit, ListTracker
from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder
from llm_lifecycle.workflows.engine.trainer import CompiledWithFallback, expert_load_metrics

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
    assert torch.equal(model._step_counts, (load_a + 2 * load_b).float())
    model.begin_global_batch()
    model(a)
    assert torch.equal(model._step_counts, load_a.float())


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


def biased_router_run(tmp_path: Path, bias_update: float, steps: int = 40) -> tuple[list[dict], Decoder]:
    """DeepSeek-V3 routing (sigmoid, top-1 of 4) whose router sends nearly every token to
    expert 0: every embedding carries one shared feature that only expert 0's router row
    reads. Only the final norm trains (it cannot change the routing) and no balance loss is
    on, so anything that evens the load out is the bias update."""
    from llm_lifecycle.workflows.runner.stage import SilentProgress, StageContext
    from llm_lifecycle.workflows.engine.trainer import TrainSettings, lm_loss, train

    torch.manual_seed(0)
    cfg = ModelConfig(family="deepseek_v3", vocab_size=97, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                      max_seq_len=16, tie_embeddings=False, n_experts=4, n_experts_per_token=1, moe_ffn_dim=16,
                      router_score="sigmoid", router_bias=True, router_bias_update=bias_update,
                      router_aux_loss_coef=0.0)
    model = Decoder(cfg)
    with torch.no_grad():
        router = model.layers[0].ffn.router.weight
        router.normal_(0.0, 1.0)  # scores that differ from token to token
        model.tok_embeddings.weight[:, 0] = 0.5
        router[:, 0] = 0.0
        router[0, 0] = 0.6
    settings = TrainSettings(
        steps=steps, batch_size=4, seq_len=16, grad_accum=2, lr=1e-3, min_lr_ratio=1.0, warmup_steps=0,
        weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0, checkpoint_every=steps, log_every=1,
        precision="fp32", compile=False, activation_checkpointing=False,
    )

    def batches(start: int):
        micro = start
        while True:
            ids = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(micro))
            yield ids[:, :-1], ids[:, 1:]
            micro += 1

    tracker = ListTracker()
    ctx = StageContext(stage="pretrain", kind="pretrain", recipe=None, workspace=tmp_path, stage_dir=tmp_path,
                       inputs={}, sources={}, values={},
                       tracker=tracker, progress=SilentProgress())
    train(ctx, model, settings, batches, lm_loss, tmp_path / "checkpoints", flops_per_token=1.0,
          trainable=[("norm.weight", model.norm.weight)])
    return tracker.rows, model


def test_v3_bias_update_alone_balances_an_imbalanced_router(tmp_path):
    rows, model = biased_router_run(tmp_path / "update", bias_update=0.01, steps=30)
    frozen_rows, frozen = biased_router_run(tmp_path / "frozen", bias_update=0.0, steps=3)
    first, last = rows[0], rows[-5:]
    # relative loads (1.0 = a quarter of the tokens): expert 0 takes nearly all at first
    assert first["moe.layer0.max_load"] > 3.0 and first["moe.layer0.min_load"] < 0.1
    assert max(r["moe.layer0.max_load"] for r in last) < 1.6  # each expert near its quarter
    assert min(r["moe.layer0.min_load"] for r in last) > 0.5
    bias = model.layers[0].ffn.score_bias
    assert bias[0] < 0 < bias[1:].min()  # the busy expert pushed down, the idle ones up
    router = model.layers[0].ffn.router.weight
    assert torch.equal(router, frozen.layers[0].ffn.router.weight)  # the router itself never moved
    assert all(r["moe.layer0.max_load"] > 3.0 for r in frozen_rows) and not frozen.layers[0].ffn.score_bias.any()


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
    from llm_lifecycle.workflows.runner.stage import UserError
    from llm_lifecycle.workflows.engine.trainer import DamagedCheckpoint, read_checkpoint

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
