"""RL from preferences: DPO against a frozen reference (the SFT model), optionally with an
added language-model loss on the chosen answer (Qwen2). Preference accuracy and reward
margin are measured on held-out pairs before and after."""

from __future__ import annotations

import copy

import torch

from llm_lifecycle.workflows.model_stage import builtin_or_path, load_upstream_model, save_stage_model
from llm_lifecycle.workflows.stage import StageContext, StageResult, UserError
from llm_lifecycle.workflows.trainer import TrainSettings, train

METHODS = ("dpo",)


def _pairs(ctx: StageContext, cfg: dict, tokenizer) -> list:
    from llm_lifecycle.workflows.chat_data import encode_preference, load_preference_pairs

    raw = []
    for uri in cfg["data"]:
        try:
            raw.extend(load_preference_pairs(builtin_or_path(uri, "stages.rl.data")))
        except ValueError as err:
            raise UserError(f"stages.rl.data: {err}") from None
    encoded = (encode_preference(tokenizer, p, c, r, cfg["seq_len"]) for p, c, r in raw)
    # Pairs whose answers fall past seq_len carry no signal: skip them.
    usable = [e for e in encoded if any(e[0][1]) and any(e[1][1])]
    return usable[: cfg["max_pairs"] + cfg["heldout_pairs"]]


def _logps(model, batch):
    from llm_lifecycle.workflows.chat_data import sequence_logprobs

    chosen_ids, chosen_tgt, rejected_ids, rejected_tgt = batch
    width = max(chosen_ids.size(1), rejected_ids.size(1))
    pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.size(1)), value=v)  # noqa: E731
    ids = torch.cat([pad(chosen_ids, 0), pad(rejected_ids, 0)])
    tgt = torch.cat([pad(chosen_tgt, -100), pad(rejected_tgt, -100)])
    logps = sequence_logprobs(model(ids).logits.float(), tgt)
    n = chosen_ids.size(0)
    return logps[:n], logps[n:], tgt[:n]


def _heldout_metrics(policy, reference, batches, beta) -> dict[str, float]:
    from llm_lifecycle.workflows.chat_data import dpo_loss

    totals: dict[str, float] = {}
    with torch.no_grad():
        for batch in batches:
            pc, pr, _ = _logps(policy, batch)
            rc, rr, _ = _logps(reference, batch)
            _, m = dpo_loss(pc, pr, rc, rr, beta)
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(batches)
    return totals


def run(ctx: StageContext, cfg: dict) -> StageResult:
    from llm_lifecycle.workflows.chat_data import PreferenceBatches, dpo_loss

    if cfg["method"] not in METHODS:
        raise UserError(f"stages.rl.method: '{cfg['method']}' is not available; choose one of {', '.join(METHODS)}")
    settings = TrainSettings.from_cfg(cfg)
    policy, tokenizer, _ = load_upstream_model(ctx, "sft")
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    pairs = _pairs(ctx, cfg, tokenizer)
    heldout, train_pairs = pairs[: cfg["heldout_pairs"]], pairs[cfg["heldout_pairs"]:]
    if not train_pairs:
        raise UserError("stages.rl: no training pairs left after the held-out split; raise max_pairs")
    pad = tokenizer.token_to_id("<|endoftext|>")
    held = PreferenceBatches(heldout, settings.batch_size, seed=ctx.seed, pad_id=pad)
    held_batches = [held.batch(i) for i in range(max(1, len(heldout) // settings.batch_size))]
    before = _heldout_metrics(policy, reference, held_batches, cfg["beta"])
    data = PreferenceBatches(train_pairs, settings.batch_size, seed=ctx.seed, pad_id=pad)

    def loss_fn(model, batch):
        pc, pr, chosen_tgt = _logps(model, batch)
        with torch.no_grad():
            rc, rr, _ = _logps(reference.to(pc.device), batch)
        sft_nll = -(pc / (chosen_tgt != -100).sum(-1).clamp(min=1)).mean() if cfg["sft_weight"] else None
        loss, m = dpo_loss(pc, pr, rc, rr, cfg["beta"], sft_nll=sft_nll, sft_weight=cfg["sft_weight"])
        return loss, {k: float(v) for k, v in m.items()}

    summary = train(
        ctx, policy, settings, data.batches, loss_fn,
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=policy.cfg.flops_per_token(settings.seq_len) * 4 / 3,  # + reference forward
        description="dpo",
    )
    after = _heldout_metrics(policy.cpu(), reference.cpu(), held_batches, cfg["beta"])
    summary.update({f"heldout_before.{k}": v for k, v in before.items()})
    summary.update({f"heldout_after.{k}": v for k, v in after.items()})
    model_dir = save_stage_model(ctx, policy, tokenizer, extra={"method": cfg["method"]})
    return StageResult(outputs={"model": str(model_dir)}, metrics=summary, model_dir=str(model_dir))
