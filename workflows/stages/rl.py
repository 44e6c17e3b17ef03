"""Stage rl: align the SFT model. One method per run (`rl.method`, `llm rl --method`):

  rm      reward model: value head on the last token, ranking loss with margin (Llama 2)
  dpo     DPO against the frozen SFT model, optional language-model term (Qwen2)
  ppo     PPO with a critic, KL 0.04 to the reference, running reward normalisation (Qwen)
  grpo    GRPO: group sampling, group-relative advantages, KL to the reference (DeepSeek-R1, Qwen3)
  rs-sft  rejection sampling: keep correct samples of the SFT model, fine-tune on them (DeepSeek-R1)
  iterative-dpo  online iterative DPO: rounds of sampling, ranking by a reward model, DPO on best
          vs worst (Qwen2; workflows/rl/iterative_dpo.py)

rm and dpo learn from preference pairs (`data`); ppo, grpo and rs-sft from problems with a
checkable final answer (`problems`, GSM8K format) scored by workflows/rl/verifiable.py. Each
run registers its model under the method's name as alias (the policies also as `rl`).
Held-out preference accuracy (rm, dpo) and held-out answer accuracy (`eval_data`) are
measured before and after.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from dataclasses import dataclass

import torch

from llm_lifecycle.workflows.engine.model_stage import load_init_model, load_input_model, save_stage_model
from llm_lifecycle.workflows.engine.trainer import TrainSettings, train
from llm_lifecycle.workflows.refs import read_data_files, resolve_model_dir
from llm_lifecycle.workflows.rl.verifiable import (
    DEFAULT_SYSTEM_PROMPT,
    AnswerEvalSettings,
    heldout_answer_accuracy,
    load_problem_files,
)
from llm_lifecycle.workflows.runner.settings import (
    AT_LEAST_1,
    FRACTION,
    NON_EMPTY_STRINGS,
    NON_NEGATIVE,
    POSITIVE,
    setting,
    with_defaults,
)
from llm_lifecycle.workflows.runner.stage import Port, StageContext, StageKind, StageResult, UserError

HALVES = ("all", "a", "b")
METHODS = ("dpo", "rm", "ppo", "grpo", "rs-sft", "iterative-dpo")


@dataclass
class RLSettings(with_defaults(TrainSettings, steps=40, batch_size=4, lr=1e-4, warmup_steps=4), AnswerEvalSettings):
    method: str = setting("dpo", "rm | dpo | ppo | grpo | rs-sft | iterative-dpo (see the module's docstring)",
                          choices=METHODS)
    beta: float = setting(0.1, "DPO's beta: how far the policy may move from the reference", limit=POSITIVE)
    sft_weight: float = setting(0.0, "DPO: weight of an added language-model loss on the chosen reply",
                                limit=NON_NEGATIVE)
    data: list[str] = setting(["builtin:chat/en_hh_rlhf_harmless-base_test.jsonl.gz", "builtin:chat/zh_oasst1_rm_zh.json"],
                              "preference pairs (rm, dpo): builtin:NAME or paths", limit=NON_EMPTY_STRINGS)
    data_half: str = setting("all", "rm, dpo: all preference pairs, or only half a (even-numbered) or b (odd-numbered): "
                             "two reward models from disjoint data, one to reward, one to judge", choices=HALVES)
    max_pairs: int = setting(2000, "train on at most this many pairs", limit=AT_LEAST_1)
    heldout_pairs: int = setting(64, "pairs held out for preference accuracy and margin", limit=AT_LEAST_1)
    rm_margin: float = setting(0.5, "rm: ranking loss -log sigmoid(r_chosen - r_rejected - margin) (Llama 2)",
                               limit=NON_NEGATIVE)
    problems: list[str] = setting(["builtin:arith/train.jsonl.gz"], "ppo, grpo, rs-sft: GSM8K-format problems, "
                                  "rewarded for the exact final number and the format", limit=NON_EMPTY_STRINGS)
    group_size: int = setting(8, "samples per prompt (ppo, grpo: batch_size prompts per step)", limit=AT_LEAST_1)
    temperature: float = setting(1.0, "sampling temperature", limit=POSITIVE)
    top_p: float = setting(1.0, "nucleus sampling mass", limit=FRACTION)
    kl_coef: float = setting(0.04, "KL to the frozen reference (Qwen's PPO; DeepSeekMath's GRPO)", limit=NON_NEGATIVE)
    format_reward: float = setting(0.2, "paid for ending with a '#### N' line; a right answer pays 1",
                                   limit=NON_NEGATIVE)
    clip: float = setting(0.2, "PPO/GRPO ratio clip", limit=POSITIVE)
    ppo_epochs: int = setting(2, "PPO passes over each rollout", limit=AT_LEAST_1)
    gamma: float = setting(1.0, "PPO discount", limit=FRACTION)
    gae_lambda: float = setting(0.95, "PPO GAE lambda", limit=FRACTION)
    vf_coef: float = setting(0.5, "PPO value-loss weight", limit=NON_NEGATIVE)
    rs_prompts: int = setting(256, "rs-sft: problems sampled for rejection sampling", limit=AT_LEAST_1)
    rounds: int = setting(3, "iterative-dpo: rounds of sampling, ranking by the reward model and `steps` DPO steps",
                          limit=AT_LEAST_1)
    prompts: list[str] = setting(["builtin:chat/en_hh_rlhf_harmless-base_test.jsonl.gz"],
                                 "iterative-dpo: chat prompts, the prompt turns of preference pairs (builtin:NAME or "
                                 "paths)", limit=NON_EMPTY_STRINGS)
    prompts_per_round: int = setting(64, "iterative-dpo: prompts per round, group_size replies each", limit=AT_LEAST_1)
    heldout_prompts: int = setting(64, "iterative-dpo: prompts kept out of the rounds; the held-out reward and the "
                                   "judge's win rate against the SFT model are measured on them", limit=AT_LEAST_1)
    init: str | None = setting(None, "align this model (models:/..., a folder, a hub id) instead of the input's")


def _system_prompt(ctx: StageContext) -> str:
    """The system prompt the input model was fine-tuned with (passed on by its sft stage)."""
    return ctx.values.get("system_prompt", DEFAULT_SYSTEM_PROMPT)


# ---- data ---------------------------------------------------------------------------------------


def _pairs(ctx: StageContext, cfg: RLSettings, tokenizer) -> list:
    from llm_lifecycle.workflows.data.chat_data import encode_preference, load_preference_pairs

    raw = read_data_files(cfg.data, f"stages.{ctx.stage}.data", load_preference_pairs)
    if cfg.data_half != "all":
        raw = raw[HALVES.index(cfg.data_half) - 1 :: 2]
    system = _system_prompt(ctx)
    encoded = (encode_preference(tokenizer, p, c, r, cfg.seq_len, default_system=system) for p, c, r in raw)
    # Pairs whose answers fall past seq_len carry no signal: skip them (encoding stops once enough are found).
    usable = (e for e in encoded if any(e[0][1]) and any(e[1][1]))
    return list(itertools.islice(usable, cfg.max_pairs + cfg.heldout_pairs))


def _split_pairs(ctx: StageContext, cfg: RLSettings, tokenizer) -> tuple[list, list]:
    pairs = _pairs(ctx, cfg, tokenizer)
    heldout, train_pairs = pairs[: cfg.heldout_pairs], pairs[cfg.heldout_pairs:]
    if not train_pairs or not heldout:
        raise UserError(f"stages.{ctx.stage}: {len(pairs)} usable pairs cannot fill heldout_pairs={cfg.heldout_pairs} "
                        "and leave some to train on; add data or lower heldout_pairs")
    return heldout, train_pairs


def _train_settings(cfg: RLSettings, **changes) -> RLSettings:
    return dataclasses.replace(cfg, **changes)


# ---- preference methods -----------------------------------------------------------------------


def _dpo_heldout(policy, reference, batches, beta) -> dict[str, float]:
    from llm_lifecycle.workflows.data.chat_data import dpo_loss, pair_logps

    totals: dict[str, float] = {}
    with torch.no_grad():
        for batch in batches:
            pc, pr, _ = pair_logps(policy, batch)
            rc, rr, _ = pair_logps(reference, batch)
            _, m = dpo_loss(pc, pr, rc, rr, beta)
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(batches)
    return totals


def run_dpo(ctx: StageContext, cfg: RLSettings, policy, tokenizer):
    from llm_lifecycle.workflows.data.chat_data import PreferenceBatches, dpo_train_loss

    settings = _train_settings(cfg)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    heldout, train_pairs = _split_pairs(ctx, cfg, tokenizer)
    pad = tokenizer.token_to_id("<|endoftext|>")
    held = PreferenceBatches(heldout, settings.batch_size, seed=ctx.seed, pad_id=pad)
    held_batches = [held.batch(i) for i in range(max(1, len(heldout) // settings.batch_size))]
    before = _dpo_heldout(policy, reference, held_batches, cfg.beta)
    data = PreferenceBatches(train_pairs, settings.batch_size, seed=ctx.seed, pad_id=pad)
    summary = train(
        ctx, policy, settings, data.batches, dpo_train_loss(reference, cfg.beta, cfg.sft_weight),
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=policy.cfg.flops_per_token(settings.seq_len) * 4 / 3,  # + reference forward
        description="dpo",
    )
    after = _dpo_heldout(policy.cpu(), reference.cpu(), held_batches, cfg.beta)
    summary.update({f"heldout_before.{k}": v for k, v in before.items()})
    summary.update({f"heldout_after.{k}": v for k, v in after.items()})
    return policy, summary


def run_rm(ctx: StageContext, cfg: RLSettings, policy, tokenizer):
    from llm_lifecycle.workflows.rl.reward_model import PairBatches, RewardModel, heldout_accuracy, rm_loss

    settings = _train_settings(cfg)
    model = RewardModel(policy)
    heldout, train_pairs = _split_pairs(ctx, cfg, tokenizer)
    pad = tokenizer.token_to_id("<|endoftext|>")
    held = PairBatches(heldout, settings.batch_size, seed=ctx.seed, pad_id=pad)
    before = heldout_accuracy(model, held)
    data = PairBatches(train_pairs, settings.batch_size, seed=ctx.seed, pad_id=pad)
    summary = train(
        ctx, model, settings, data.batches, rm_loss(cfg.rm_margin),
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=policy.cfg.flops_per_token(settings.seq_len),
        description="reward model",
    )
    after = heldout_accuracy(model.cpu(), held)
    summary.update({f"heldout_before.{k}": v for k, v in before.items()})
    summary.update({f"heldout_after.{k}": v for k, v in after.items()})
    return model, summary


# ---- methods that sample from the policy ----------------------------------------------------------


def _rollout_settings(ctx: StageContext, cfg: RLSettings):
    from llm_lifecycle.workflows.rl.policy_opt import RolloutSettings
    from llm_lifecycle.workflows.rl.verifiable import RewardWeights

    return RolloutSettings(
        group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, system_prompt=_system_prompt(ctx),
        weights=RewardWeights(correct=1.0, format=cfg.format_reward),
    )


def _rollout_flops(policy, settings: TrainSettings) -> float:
    # Per trained token: the update (6N) plus sampling and the reference pass (~2N each).
    return policy.cfg.flops_per_token(settings.seq_len) * 5 / 3


def run_grpo(ctx: StageContext, cfg: RLSettings, policy, tokenizer):
    from llm_lifecycle.workflows.rl.policy_opt import grpo_batches, grpo_loss, pad_id_of

    settings = _train_settings(cfg, grad_accum=1)
    problems = load_problem_files(cfg.problems, f"stages.{ctx.stage}.problems")
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    batches = grpo_batches(policy, reference, tokenizer, problems, settings.batch_size, _rollout_settings(ctx, cfg),
                           ctx.seed, pad_id_of(tokenizer))
    summary = train(
        ctx, policy, settings, batches, grpo_loss(cfg.kl_coef),
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=_rollout_flops(policy, settings),
        description="grpo",
    )
    return policy, summary


def run_ppo(ctx: StageContext, cfg: RLSettings, policy, tokenizer):
    from llm_lifecycle.workflows.rl.policy_opt import ActorCritic, pad_id_of, ppo_batches, ppo_loss

    settings = _train_settings(cfg, grad_accum=1)
    problems = load_problem_files(cfg.problems, f"stages.{ctx.stage}.problems")
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    model = ActorCritic(policy)
    batches = ppo_batches(model, reference, tokenizer, problems, settings.batch_size, _rollout_settings(ctx, cfg),
                          ctx.seed, pad_id_of(tokenizer), cfg.kl_coef, cfg.ppo_epochs, cfg.gamma,
                          cfg.gae_lambda)
    summary = train(
        ctx, model, settings, batches, ppo_loss(cfg.clip, cfg.vf_coef),
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=_rollout_flops(policy, settings) * 2,  # + the critic
        description="ppo",
    )
    return model.policy, summary


def run_rs_sft(ctx: StageContext, cfg: RLSettings, policy, tokenizer):
    """Sample `group_size` answers for each of `rs_prompts` problems, keep one correct,
    well-formed answer per problem, and fine-tune on those (assistant-only loss)."""
    from llm_lifecycle.workflows.rl.rejection import correct_answers, fine_tune_on

    rollout = _rollout_settings(ctx, cfg)
    problems = load_problem_files(cfg.problems, f"stages.{ctx.stage}.problems")[: cfg.rs_prompts]
    kept = correct_answers(ctx, policy, tokenizer, problems, rollout)
    summary = fine_tune_on(ctx, policy, tokenizer, _train_settings(cfg), kept, rollout.system_prompt)
    summary.update({"rs_kept": float(len(kept)), "rs_acceptance": len(kept) / len(problems)})
    return policy, summary


def _reward_model_on(ctx: StageContext, port: str):
    """The reward model of the rl instance (method rm) on `port`."""
    from llm_lifecycle.workflows.rl.reward_model import load_reward_model

    path = ctx.input_path(port, "reward_model")
    return load_reward_model(path)[0]


def _chat_prompts(ctx: StageContext, cfg: RLSettings) -> tuple[list, list]:
    """(training prompts, held-out prompts): the distinct prompt turns of the `prompts` pairs,
    in file order; the last `heldout_prompts` are held out (reward models that read the same
    files from the start reach them only if they read them whole)."""
    from llm_lifecycle.workflows.data.chat_data import load_preference_pairs

    pairs = read_data_files(cfg.prompts, f"stages.{ctx.stage}.prompts", load_preference_pairs)
    distinct = list({json.dumps(p, sort_keys=True): p for p, _, _ in pairs}.values())
    if len(distinct) <= cfg.heldout_prompts:
        raise UserError(f"stages.{ctx.stage}: {len(distinct)} distinct prompts cannot fill heldout_prompts="
                        f"{cfg.heldout_prompts} and leave some for the rounds; add prompts or lower heldout_prompts")
    return distinct[: -cfg.heldout_prompts], distinct[-cfg.heldout_prompts:]


def run_iterative_dpo(ctx: StageContext, cfg: RLSettings, policy, tokenizer):
    from llm_lifecycle.workflows.rl.iterative_dpo import IterativeDPOSettings, iterative_dpo

    if "reward_model" not in ctx.inputs:
        raise UserError(f"stages.{ctx.stage}: method iterative-dpo ranks samples with a reward model; add "
                        "`from: {model: SFT, reward_model: RM}` naming an rl instance with method rm")
    judge = _reward_model_on(ctx, "judge") if "judge" in ctx.inputs else None
    train_prompts, heldout = _chat_prompts(ctx, cfg)
    rounds = IterativeDPOSettings(
        rounds=cfg.rounds, prompts_per_round=cfg.prompts_per_round, group_size=cfg.group_size,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, beta=cfg.beta,
        sft_weight=cfg.sft_weight, system_prompt=_system_prompt(ctx),
    )
    summary = iterative_dpo(ctx, policy, tokenizer, _reward_model_on(ctx, "reward_model"), judge, train_prompts,
                            heldout, _train_settings(cfg), rounds)
    return policy, summary


RUNNERS = {"dpo": run_dpo, "rm": run_rm, "ppo": run_ppo, "grpo": run_grpo, "rs-sft": run_rs_sft,
           "iterative-dpo": run_iterative_dpo}


def run(ctx: StageContext, cfg: RLSettings) -> StageResult:
    method = cfg.method
    ctx.tracker.set_tags({"llm.rl_method": method})
    torch.manual_seed(ctx.seed)
    if cfg.init:
        policy, tokenizer = load_init_model(cfg.init, f"stages.{ctx.stage}.init")
        sft_dir = str(resolve_model_dir(cfg.init))
    else:
        policy, tokenizer, sft_dir = load_input_model(ctx)
    before = heldout_answer_accuracy(ctx, cfg, policy, tokenizer, _system_prompt(ctx)) if method != "rm" else {}
    trained, summary = RUNNERS[method](ctx, cfg, policy, tokenizer)
    if method == "rm":
        from llm_lifecycle.workflows.rl.reward_model import save_reward_model

        rm_dir = save_reward_model(ctx.stage_dir / "reward_model", trained, tokenizer,
                                   extra={"stage": ctx.stage, "recipe": ctx.recipe.name, "method": method})
        # The policy is unchanged: later stages keep evaluating and exporting the SFT model.
        return StageResult(outputs={"model": str(sft_dir), "reward_model": str(rm_dir)}, metrics=summary,
                           model_dir=str(rm_dir), model_alias="rm")
    if before:
        after = heldout_answer_accuracy(ctx, cfg, trained.cpu(), tokenizer, _system_prompt(ctx))
        summary.update({"heldout_accuracy_before": before["accuracy"], "heldout_accuracy": after["accuracy"],
                        "heldout_format_rate": after["format_rate"]})
    model_dir = save_stage_model(ctx, trained, tokenizer, extra={"method": method})
    return StageResult(outputs={"model": str(model_dir)}, metrics=summary, model_dir=str(model_dir),
                       aliases=[method])


KIND = StageKind("rl", RLSettings, run, inputs=(
    Port("model", "model", unless="init"),
    # iterative-dpo: the rl instances (method rm) whose reward models rank the samples and judge the rounds
    Port("reward_model", "model", required=False, default=False, passes=False),
    Port("judge", "model", required=False, default=False, passes=False),
), output="model", trains=True)
