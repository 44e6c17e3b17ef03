"""DeepSeek-V3 multi-token prediction: each module computes the report's formula, its loss
is logged per step and falls as it trains, and the saved model is the main model alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import ListTracker
from llm_lifecycle.models.config import ModelConfig
from llm_lifecycle.models.decoder import Decoder
from llm_lifecycle.models.mtp import MultiTokenPrediction
from llm_lifecycle.workflows.stages.pretrain import mtp_loss
from llm_lifecycle.workflows.runner.recipe import ConfigError, load_recipe
from llm_lifecycle.workflows.runner.stage import SilentProgress, StageContext
from llm_lifecycle.workflows.engine.trainer import TrainSettings, lm_loss, train

CFG = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


def test_the_first_module_predicts_the_token_after_next_from_the_report_formula():
    torch.manual_seed(0)
    decoder = Decoder(ModelConfig(**CFG)).eval()
    model = MultiTokenPrediction(decoder, depth=2, weight=0.3).eval()
    ids = torch.randint(0, 64, (2, 13))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        out = model(inputs, targets=targets)
        plain = decoder(inputs, targets=targets)
        m = model.mtp[0]
        n = inputs.size(1) - 1
        # h'_i = M [RMSNorm(h_i); RMSNorm(Emb(t_{i+1}))], then the block, the norm and the shared head
        x = m.proj(torch.cat((m.hidden_norm(plain.hidden[:, :n]), m.embed_norm(decoder.tok_embeddings(targets[:, :n]))), -1))
        x, _ = m.block(x, decoder.rope(0, n, x.device), None, None)
        logits = decoder.lm_head(m.out_norm(x))
        first = F.cross_entropy(logits.reshape(-1, 64), targets[:, 1:].reshape(-1))
    assert model.mtp_losses[0] == pytest.approx(first.item(), rel=1e-5)
    assert len(model.mtp_losses) == 2
    assert torch.equal(out.loss, plain.loss)  # the next-token loss unchanged
    assert out.aux_loss.item() == pytest.approx(0.3 * sum(model.mtp_losses) / 2, rel=1e-5)
    assert set(model.state_dict()) - {f"decoder.{k}" for k in decoder.state_dict()}  # the modules are extra weights
    assert model.flops_per_token(12) > decoder.cfg.flops_per_token(12)


def test_mtp_loss_is_logged_each_step_and_falls(tmp_path):
    torch.manual_seed(0)
    decoder = Decoder(ModelConfig(**CFG))
    model = MultiTokenPrediction(decoder, depth=1, weight=0.3)
    settings = TrainSettings(
        steps=30, batch_size=8, seq_len=16, grad_accum=1, lr=3e-3, min_lr_ratio=0.1, warmup_steps=3,
        weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0, checkpoint_every=30, log_every=1,
        precision="fp32", compile=False, activation_checkpointing=False,
    )

    def batches(start: int):  # token t+1 = token t + 1 or 2: the token after next is learnable too
        micro = start
        while True:
            g = torch.Generator().manual_seed(micro)
            first = torch.randint(0, 64, (8, 1), generator=g)
            seq = torch.cat((first, first + torch.randint(1, 3, (8, 16), generator=g).cumsum(1)), dim=1) % 64
            yield seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
            micro += 1

    tracker = ListTracker()
    ctx = StageContext(stage="pretrain", kind="pretrain", recipe=None, workspace=tmp_path, stage_dir=tmp_path,
                       inputs={}, sources={}, values={},
                       tracker=tracker, progress=SilentProgress())
    train(ctx, model, settings, batches, mtp_loss, tmp_path / "checkpoints", flops_per_token=model.flops_per_token(16))
    losses = [row["mtp_loss"] for row in tracker.rows if "mtp_loss" in row]
    assert len(losses) == 30 and all(row["mtp_loss.depth1"] == row["mtp_loss"] for row in tracker.rows)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # ln 64 = 4.2 at the start
    assert all(row["loss"] == pytest.approx(row["ce_loss"] + row["aux_loss"], rel=1e-5) for row in tracker.rows)
    assert lm_loss(decoder, next(batches(0)))[0].isfinite()  # the main model trains on and stands alone


def test_mtp_settings_are_checked_before_any_run():
    assert load_recipe("generic", ["pretrain.mtp_depth=1"]).settings("pretrain").mtp_weight == 0.3
    with pytest.raises(ConfigError, match="stages.pretrain.mtp_depth: .*>= 0"):
        load_recipe("generic", ["pretrain.mtp_depth=-1"])
    with pytest.raises(ConfigError, match="objective glm_blank_infilling has its own targets"):
        load_recipe("generic", ["model.preset=chatglm-small", "pretrain.objective=glm_blank_infilling",
                                "pretrain.mtp_depth=1"])
