"""Stage rl: align the SFT model. One method per run (`rl.method`, `llm rl --method`):

  rm      reward model: value head on the last token, ranking loss with margin (Llama 2)
  dpo     DPO against the frozen SFT model, optional language-model term (Qwen2)
  ppo     PPO with a critic, KL 0.04 to the reference, running reward normalisation (Qwen)
  grpo    GRPO: group sampling, group-relative advantages, KL to the reference (DeepSeek-R1, Qwen3)
  rs-sft  rejection sampling: keep correct samples of the SFT model, fine-tune on them (DeepSeek-R1)
  iterative-dpo  online iterative DPO: rounds of sampling, ranking by a reward model, DPO on best
          vs worst (Qwen2; workflows/rl/iterative_dpo.py)

rm and dpo learn from preference pairs (`data`); ppo, grpo and iterative-dpo from prompts (`problems`:
GSM8K problems with checkable answers, or the conversations of chat and preference files)
scored by workflows/rl/rewards.py: a reward model wired to the `reward_model` input (and
Llama 2's `safety_model`), the rule rewards, or a weighted sum; rs-sft from problems with
answers. Each run registers its model under the method's name as alias (the policies also
as `rl`). Held-out preference accuracy (rm, dpo; per kind when `kinds` names them),
held-out answer accuracy (`eval_data`), and for ppo/grpo the held-out reward of sampled
replies, their KL to the reference and a `judge` reward model's win rate against the
input model's replies are measured before and after.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import zlib
from dataclasses import dataclass

import torch

from llm_lifecycle.workflows.engine.model_stage import (
    check_thinking_budget,
    load_init_model,
    load_input_model,
    model_provenance,
    save_stage_model,
)
from llm_lifecycle.workflows.engine.trainer import TrainSettings, train
from llm_lifecycle.workflows.refs import read_data_files, resolve_model_dir
from llm_lifecycle.workflows.rl.rewards import RewardSettings, check_kinds, has_answers, load_prompts
from llm_lifecycle.workflows.rl.verifiable import (
    DEFAULT_SYSTEM_PROMPT,
    AnswerEvalSettings,
    heldout_answer_accuracy,
    load_problems,
)
from llm_lifecycle.workflows.runner.settings import (
    AT_LEAST_1,
    FRACTION,
    NON_EMPTY_STRINGS,
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    setting,
    with_defaults,
)
from llm_lifecycle.workflows.runner.stage import Port, StageContext, StageKind, StageResult, UserError

METHODS = ("dpo", "rm", "ppo", "grpo", "rs-sft", "iterative-dpo")
REWARDED = ("ppo", "grpo", "iterative-dpo")  # sample replies and reward them (workflows/rl/rewards.py)
SAMPLED = (*REWARDED, "rs-sft")  # sample from the policy (the thinking budget applies)


@dataclass
class RLSettings(with_defaults(TrainSettings, steps=40, batch_size=4, lr=1e-4, warmup_steps=4), AnswerEvalSettings,
                 RewardSettings):
    method: str = setting("dpo", "rm | dpo | ppo | grpo | rs-sft | iterative-dpo (see the module's docstring)",
                          choices=METHODS)
    beta: float = setting(0.1, "DPO's beta: how far the policy may move from the reference", limit=POSITIVE)
    sft_weight: float = setting(0.0, "DPO: weight of an added language-model loss on the chosen reply",
                                limit=NON_NEGATIVE)
    data: list[str] = setting(["builtin:chat/en_hh_rlhf_harmless-base_test.jsonl.gz", "builtin:chat/zh_oasst1_rm_zh.json"],
                              "preference pairs (rm, dpo): builtin:NAME or paths", limit=NON_EMPTY_STRINGS,
                              files=True)
    max_pairs: int = setting(2000, "train on at most this many pairs of each data file", limit=AT_LEAST_1)
    heldout_pairs: int = setting(64, "pairs of each data file held out for preference accuracy and margin",
                                 limit=AT_LEAST_1)
    rm_pooling: str = setting("last", "rm: score at the reply's last token (InstructGPT, Llama 2) or the mean over its "
                                      "tokens (learns more from few pairs at small sizes; docs/benchmarks.md)",
                              choices=("last", "mean"))
    pair_half: str = setting("all", "train on all pairs left after the held-out ones, or on half a (even "
                                    "positions) or b (odd): a judge trained on the other half than the reward's",
                             choices=("all", "a", "b"))
    mismatched_pairs: float = setting(0.0, "rm: per trained pair, add this many pairs (0.5: one for every second "
                                            "pair) of a training prompt's chosen reply over the chosen reply of a "
                                            "training pair from another data file (another language or kind), drawn "
                                            "from the seed within the instance's own pairs; teaches that a reply to "
                                            "another file's prompt is worse (needs two data files; 0: none)",
                                      limit=NON_NEGATIVE)
    rm_margin: float = setting(0.5, "rm: ranking loss -log sigmoid(r_chosen - r_rejected - margin) (Llama 2)",
                               limit=NON_NEGATIVE)
    problems: list[str] = setting(["builtin:arith/train.jsonl.gz"], "ppo, grpo, iterative-dpo: prompts (GSM8K "
                                  "problems, chat or preference files); rs-sft: GSM8K problems", limit=NON_EMPTY_STRINGS,
                                  files=True)
    heldout_prompts: int = setting(0, "the first N prompts of each `problems` file, in file order, never trained on "
                                      "by any method; ppo, grpo, iterative-dpo measure the reward, KL and judge win "
                                      "rate of sampled replies on them (0: none)", limit=NON_NEGATIVE)
    group_size: int = setting(8, "samples per prompt (ppo, grpo: batch_size prompts per step)", limit=AT_LEAST_1)
    temperature: float = setting(1.0, "sampling temperature", limit=POSITIVE)
    top_p: float = setting(1.0, "nucleus sampling mass", limit=FRACTION)
    thinking_budget: int = setting(0, "ppo, grpo, iterative-dpo, rs-sft: at most this many thinking tokens per "
                                      "sample, then </think> is forced (Qwen3; the model's tokenizer needs <think>); "
                                      "0: no limit", limit=NON_NEGATIVE)
    kl_coef: float = setting(0.04, "KL to the frozen reference (Qwen's PPO; DeepSeekMath's GRPO)", limit=NON_NEGATIVE)
    clip: float = setting(0.2, "PPO/GRPO ratio clip", limit=POSITIVE)
    ppo_epochs: int = setting(2, "PPO passes over each rollout", limit=AT_LEAST_1)
    gamma: float = setting(1.0, "PPO discount", limit=FRACTION)
    gae_lambda: float = setting(0.95, "PPO GAE lambda", limit=FRACTION)
    vf_coef: float = setting(0.5, "PPO value-loss weight", limit=NON_NEGATIVE)
    rs_prompts: int = setting(256, "rs-sft: problems sampled for rejection sampling", limit=AT_LEAST_1)
    rounds: int = setting(3, "iterative-dpo: rounds of sampling, ranking by the reward model and `steps` DPO steps",
                          limit=AT_LEAST_1)
    prompts_per_round: int = setting(64, "iterative-dpo: prompts per round, group_size replies each", limit=AT_LEAST_1)
    init: str | None = setting(None, "align this model (models:/..., a folder, a hub id) instead of the input's")

    def makes(self) -> set[str]:
        return {"reward_model"} if self.method == "rm" else set()

    def check(self, where: str, upstream: dict) -> None:
        super().check(where, upstream)
        check_kinds(self, self.data if self.method in ("rm", "dpo") else self.problems, where)
        if self.mismatched_pairs and (self.method != "rm" or len(self.data) < 2):
            raise ConfigError(f"{where}.mismatched_pairs: pairs against another file's reply need method rm and two "
                              f"or more data files (method {self.method}, {len(self.data)} file(s)); set it to 0 "
                              "or add a data file")
        if self.method in SAMPLED and self.heldout_prompts:
            from llm_lifecycle.workflows.data.chat_data import read_records

            # Records, not prompts (the run drops repeated conversations): cheap, and never refuses a usable value.
            counts = read_data_files(self.problems, f"{where}.problems", lambda path: [len(read_records(path))])
            if max(counts) <= self.heldout_prompts:
                raise ConfigError(f"{where}.heldout_prompts: {self.heldout_prompts} holds out every prompt of the "
                                  f"`problems` files ({', '.join(map(str, counts))} records), leaving none to train "
                                  "on; lower heldout_prompts or add prompts")

    def check_wiring(self, where: str, ports: set[str]) -> None:
        """A reward that would pay nothing, found when the graph is built, not in the stage's run."""
        if self.method not in REWARDED:
            return
        helpful = bool(self.reward_model) or "reward_model" in ports
        if (self.safety_model or "safety_model" in ports) and not helpful:
            raise ConfigError(f"{where}.safety_model: Llama 2's rule needs a helpfulness reward model too; set "
                              "reward_model or wire one with `from: {reward_model: NAME}`")
        if (helpful and self.reward_model_weight) or self.rules_pay(answers=False):
            return
        if self.rules_pay(answers=True) and any(read_data_files(self.problems, f"{where}.problems",
                                                                lambda path: [has_answers(path)])):
            return
        raise ConfigError(f"{where}.problems: no reward model and no answers to check (open-ended prompts), so every "
                          f"{self.method} reward would be 0; wire a reward model (`from: {{reward_model: NAME}}`, an "
                          "rl stage with method rm), set reward_model, or set think_reward/language_reward")

    def check_inputs(self, where: str, inputs: dict) -> None:
        from llm_lifecycle.models.checkpoint import read_config

        if self.method in SAMPLED and self.thinking_budget:
            model_dir = resolve_model_dir(self.init) if self.init else inputs["model"].outputs["model"]
            check_thinking_budget(model_dir, self.thinking_budget, f"{where}.thinking_budget")
        for key in ("reward_model", "safety_model", "judge") if self.method in REWARDED else ():
            ref = getattr(self, key)  # an instance wired to the port is an rm stage: the graph checked it
            if ref and "reward_head" not in read_config(resolve_model_dir(ref)):
                raise UserError(f"{where}.{key}: {ref} is a model but not a reward model (no reward_head in its "
                                "config.json); name the folder or models:/NAME@ALIAS of an rl stage with method rm")


def _system_prompt(ctx: StageContext) -> str:
    """The system prompt the input model was fine-tuned with (passed on by its sft stage)."""
    return ctx.values.get("system_prompt", DEFAULT_SYSTEM_PROMPT)


# ---- data ---------------------------------------------------------------------------------------


def _file_pairs(ctx: StageContext, cfg: RLSettings, tokenizer, uri: str, kind: str | None) -> list:
    """One data file's usable pairs, each (raw (prompt, chosen, rejected), encoded), under its
    kind's system prompt (COOL RLHF) or the SFT's."""
    from llm_lifecycle.workflows.data.chat_data import load_preference_pairs

    raw = read_data_files([uri], f"stages.{ctx.stage}.data", load_preference_pairs)
    encoded = ((pair, _encode_pair(ctx, cfg, tokenizer, kind, pair)) for pair in raw)
    # Pairs whose answers fall past seq_len carry no signal: skip them (encoding stops once enough are found).
    usable = (e for e in encoded if e[1] is not None)
    return list(itertools.islice(usable, cfg.max_pairs * (1 + (cfg.pair_half != "all")) + cfg.heldout_pairs))


def _encode_pair(ctx: StageContext, cfg: RLSettings, tokenizer, kind: str | None, pair: tuple):
    """(encoded chosen, encoded rejected), or None when either reply falls past seq_len."""
    from llm_lifecycle.workflows.data.chat_data import encode_preference

    prompt, chosen, rejected = pair
    system = cfg.kind_prompts.get(kind, _system_prompt(ctx))
    e = encode_preference(tokenizer, prompt, chosen, rejected, cfg.seq_len, default_system=system)
    return e if any(e[0][1]) and any(e[1][1]) else None


def _file_splits(ctx: StageContext, cfg: RLSettings, tokenizer) -> list[tuple[str | None, list, list]]:
    """(kind, held-out pairs, training pairs) of each data file, pairs as `_file_pairs` gives them:
    the first `heldout_pairs` held out, the rest (or `pair_half` of it, at most max_pairs) trained on."""
    splits = []
    for uri, kind in zip(cfg.data, check_kinds(cfg, cfg.data, f"stages.{ctx.stage}")):
        pairs = _file_pairs(ctx, cfg, tokenizer, uri, kind)
        held, rest = pairs[: cfg.heldout_pairs], pairs[cfg.heldout_pairs:]
        rest = rest if cfg.pair_half == "all" else rest[cfg.pair_half == "b" :: 2]
        if not rest or len(held) < cfg.heldout_pairs:
            raise UserError(f"stages.{ctx.stage}.data: {uri} has {len(pairs)} usable pairs, too few to hold out "
                            f"heldout_pairs={cfg.heldout_pairs} and train on the rest; add data or lower heldout_pairs")
        splits.append((kind, held, rest[: cfg.max_pairs]))
    return splits


def _split_pairs(splits: list[tuple[str | None, list, list]]) -> tuple[dict[str | None, list], list]:
    """({kind: its held-out encoded pairs}, training encoded pairs) of `_file_splits`."""
    heldout: dict[str | None, list] = {}
    for kind, held, _ in splits:
        heldout.setdefault(kind, []).extend(e for _, e in held)
    return heldout, [e for _, _, rest in splits for _, e in rest]


def mismatched_pairs(files: list[list[tuple]], per_pair: float, seed: int) -> list[tuple[int, tuple]]:
    """(file index, (prompt, chosen, rejected)) pairs whose rejected reply is the chosen reply of a
    pair from another of `files` (each a list of raw (prompt, chosen, rejected)): round(per_pair x
    its size) for each file, drawn from `seed` alone. Preference-model pretraining's mismatched
    negatives: a reward model ranks replies within a pair only, so what it pays across languages
    is arbitrary unless some pair compares a reply in the prompt's language with one in another."""
    import random

    rng = random.Random(seed)
    made = []
    for i, pairs in enumerate(files):
        others = [j for j, other in enumerate(files) if j != i and other]
        for _ in range(round(per_pair * len(pairs)) if others else 0):
            prompt, chosen, _ = rng.choice(pairs)
            made.append((i, (prompt, chosen, rng.choice(files[rng.choice(others)])[1])))
    return made


def _mismatched_encoded(ctx: StageContext, cfg: RLSettings, tokenizer, splits, part: int, per_pair: float) -> list:
    """`mismatched_pairs` of the splits' held-out (part 1) or training (part 2) pairs, encoded as theirs."""
    files = [[raw for raw, _ in split[part]] for split in splits]
    made = ((i, _encode_pair(ctx, cfg, tokenizer, splits[i][0], pair))
            for i, pair in mismatched_pairs(files, per_pair, ctx.seed + part))
    return [e for _, e in made if e is not None]


def _train_settings(cfg: RLSettings, **changes) -> RLSettings:
    return dataclasses.replace(cfg, **changes)


# ---- preference methods -----------------------------------------------------------------------


def _heldout_logps(model, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(chosen, rejected) log-probs of each held-out batch."""
    from llm_lifecycle.workflows.data.chat_data import pair_logps

    with torch.no_grad():
        return [pair_logps(model, batch)[:2] for batch in batches]


def _dpo_heldout(policy_logps, reference_logps, beta) -> dict[str, float]:
    from llm_lifecycle.workflows.data.chat_data import dpo_loss

    totals: dict[str, float] = {}
    for (pc, pr), (rc, rr) in zip(policy_logps, reference_logps):
        _, m = dpo_loss(pc, pr, rc, rr, beta)
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + float(v) / len(policy_logps)
    return totals


def run_dpo(ctx: StageContext, cfg: RLSettings, policy, tokenizer):
    from llm_lifecycle.workflows.data.chat_data import PreferenceBatches, dpo_train_loss

    settings = _train_settings(cfg)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    by_kind, train_pairs = _split_pairs(_file_splits(ctx, cfg, tokenizer))
    heldout = [pair for pairs in by_kind.values() for pair in pairs]
    pad = tokenizer.token_to_id("<|endoftext|>")
    held = PreferenceBatches(heldout, settings.batch_size, seed=ctx.seed, pad_id=pad)
    held_batches = [held.batch(i) for i in range(max(1, len(heldout) // settings.batch_size))]
    # The policy starts as the reference: one pass gives both sides of "before", and the
    # reference's log-probs serve "after" too.
    reference_logps = _heldout_logps(reference, held_batches)
    before = _dpo_heldout(reference_logps, reference_logps, cfg.beta)
    data = PreferenceBatches(train_pairs, settings.batch_size, seed=ctx.seed, pad_id=pad)
    summary = train(
        ctx, policy, settings, data.batches, dpo_train_loss(reference, cfg.beta, cfg.sft_weight),
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=policy.cfg.flops_per_token(settings.seq_len) * 4 / 3,  # + reference forward
        description="dpo",
    )
    after = _dpo_heldout(_heldout_logps(policy.cpu(), held_batches), reference_logps, cfg.beta)
    summary.update({f"heldout_before.{k}": v for k, v in before.items()})
    summary.update({f"heldout_after.{k}": v for k, v in after.items()})
    return policy, summary


def run_rm(ctx: StageContext, cfg: RLSettings, policy, tokenizer):
    from llm_lifecycle.workflows.rl.reward_model import PairBatches, RewardModel, heldout_accuracy, rm_loss

    settings = _train_settings(cfg)
    # Each instance draws its own head: a judge that starts as the very function of the reward
    # model it checks (same SFT backbone, same head) shares that function's biases after a short
    # training, and a policy that pleases one pleases the other without being better.
    torch.manual_seed(ctx.seed + zlib.crc32(ctx.stage.encode()))
    model = RewardModel(policy, max_len=settings.seq_len, pooling=cfg.rm_pooling)
    splits = _file_splits(ctx, cfg, tokenizer)
    by_kind, train_pairs = _split_pairs(splits)
    if cfg.mismatched_pairs:
        # Negatives from the instance's own training pairs only; the held-out ones get their own
        # (from held-out pairs only), measured apart from the real held-out accuracy.
        train_pairs += _mismatched_encoded(ctx, cfg, tokenizer, splits, 2, cfg.mismatched_pairs)
        mismatched = _mismatched_encoded(ctx, cfg, tokenizer, splits, 1, 1.0)
    pad = tokenizer.token_to_id("<|endoftext|>")
    held = {kind: PairBatches(pairs, settings.batch_size, seed=ctx.seed, pad_id=pad) for kind, pairs in by_kind.items()}

    def accuracy(m):
        """Over all held-out pairs, and per kind when the data files have kinds."""
        every = heldout_accuracy(m, PairBatches([p for b in held.values() for p in b.pairs], settings.batch_size,
                                                seed=ctx.seed, pad_id=pad))
        per_kind = {f"{kind}.{k}": v for kind, b in held.items() if kind for k, v in heldout_accuracy(m, b).items()}
        if cfg.mismatched_pairs:
            per_kind.update({f"mismatched.{k}": v for k, v in heldout_accuracy(
                m, PairBatches(mismatched, settings.batch_size, seed=ctx.seed, pad_id=pad)).items()})
        return {**every, **per_kind}

    before = accuracy(model)
    data = PairBatches(train_pairs, settings.batch_size, seed=ctx.seed, pad_id=pad)
    summary = train(
        ctx, model, settings, data.batches, rm_loss(cfg.rm_margin),
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=policy.cfg.flops_per_token(settings.seq_len),
        description="reward model",
    )
    after = accuracy(model.cpu())
    summary.update({f"heldout_before.{k}": v for k, v in before.items()})
    summary.update({f"heldout_after.{k}": v for k, v in after.items()})
    return model, summary


# ---- methods that sample from the policy ----------------------------------------------------------


def _rollout_settings(ctx: StageContext, cfg: RLSettings, reward=None):
    from llm_lifecycle.workflows.rl.policy_opt import RolloutSettings
    from llm_lifecycle.workflows.rl.rewards import Reward

    return RolloutSettings(
        group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, system_prompt=_system_prompt(ctx), reward=reward or Reward(cfg),
        thinking_budget=cfg.thinking_budget,
    )


# ---- ppo/grpo: prompts, reward models, held-out reward and judge ---------------------------------------


def _model_ref(ctx: StageContext, port: str, given: str | None) -> str | None:
    """The reward model folder a setting names or the instance wired to input `port` made, or None."""
    if given:
        return str(resolve_model_dir(given))
    if port not in ctx.inputs:
        return None
    return str(ctx.input_path(port, "reward_model"))  # the graph checked that the source makes one


def _load_rm(ctx: StageContext, port: str, given: str | None, key: str):
    """(reward model, its tokenizer), or (None, None) when neither setting nor input names one."""
    from llm_lifecycle.workflows.rl.reward_model import load_reward_model

    path = _model_ref(ctx, port, given)
    if path is None:
        return None, None
    try:
        return load_reward_model(path)
    except ValueError as err:
        raise UserError(f"stages.{ctx.stage}.{key}: {err}; name an rm instance or a models:/NAME@rm") from None


def _reward(ctx: StageContext, cfg: RLSettings):
    from llm_lifecycle.workflows.rl.rewards import Reward, RewardModels

    helpful, helpful_tok = _load_rm(ctx, "reward_model", cfg.reward_model, "reward_model")
    safety, safety_tok = _load_rm(ctx, "safety_model", cfg.safety_model, "safety_model")
    if helpful is None:  # the graph checked that a safety model comes with one
        return Reward(cfg)
    return Reward(cfg, RewardModels(helpful, helpful_tok, safety, safety_tok, _system_prompt(ctx),
                                    dict(cfg.kind_prompts), cfg.safety_threshold))


def heldout_split(prompts: list, n: int) -> tuple[list, list]:
    """(held out, trained on) of one `problems` file's prompts: its first `n`, in file order,
    and the rest. Every method splits this way (ppo, grpo and iterative-dpo measure on the
    held-out ones; rs-sft never samples them), before anything is dropped for length, so the
    held-out prompts depend on the file and `n` alone."""
    return prompts[:n], prompts[n:]


def _prompts(ctx: StageContext, cfg: RLSettings, tokenizer) -> tuple[list[dict], list[dict]]:
    """(held-out prompts, training prompts) of the `problems` files (`heldout_split`), each
    leaving max_new_tokens of room within seq_len."""
    from llm_lifecycle.workflows.data.chat_data import encode_prompt
    from llm_lifecycle.workflows.rl.rewards import messages_of

    where = f"stages.{ctx.stage}.problems"
    room = cfg.seq_len - cfg.max_new_tokens

    def fitting(prompts: list[dict]) -> list[dict]:
        return [p for p in prompts if len(encode_prompt(tokenizer, messages_of(p), _system_prompt(ctx))) <= room]

    heldout, train_prompts = [], []
    for uri, kind in zip(cfg.problems, check_kinds(cfg, cfg.problems, f"stages.{ctx.stage}")):
        held, rest = heldout_split([{**p, "kind": kind} for p in read_data_files([uri], where, load_prompts)],
                                   cfg.heldout_prompts)
        heldout += fitting(held)
        train_prompts += fitting(rest)
    if not train_prompts:
        raise UserError(f"{where}: no prompt left to train on: none after the first heldout_prompts="
                        f"{cfg.heldout_prompts} fits seq_len - max_new_tokens = {room} tokens; raise seq_len or "
                        "add prompts")
    return heldout, train_prompts


@torch.no_grad()
def _heldout_replies(policy, reference, tokenizer, prompts: list[dict], rollout, seed: int) -> dict:
    """One sampled reply per held-out prompt: the texts, their mean reward, and the policy's KL to
    the reference (per reply: the sum over its tokens of log π - log ref, averaged)."""
    import dataclasses as dc

    from llm_lifecycle.workflows.rl.policy_opt import pad_id_of, sample, token_logprobs

    policy.eval()
    out = sample(policy, tokenizer, prompts, dc.replace(rollout, group_size=1), seed, pad_id_of(tokenizer))
    logps = token_logprobs(policy(out.inputs).logits, out.targets).sum(-1)
    ref_logps = token_logprobs(reference(out.inputs).logits, out.targets).sum(-1)
    return {"texts": out.texts, "reward": float(out.rewards.mean()), "kl": float((logps - ref_logps).mean()),
            "tokens": float(out.lengths.mean())}


def _language_consistency(prompts: list[dict], replies: list[str], when: str) -> dict[str, float]:
    """R1's language consistency of each held-out reply, averaged per prompt kind: a policy that
    pleases a reward model by leaving the prompt's script shows here."""
    from llm_lifecycle.workflows.rl.rewards import language_consistency_reward, user_text

    by_kind: dict[str, list[float]] = {}
    for prompt, reply in zip(prompts, replies):
        by_kind.setdefault(prompt.get("kind") or "all", []).append(language_consistency_reward(user_text(prompt), reply))
    return {f"heldout_language_consistency{when}.{kind}": sum(v) / len(v) for kind, v in by_kind.items()}


def _measured(run_method):
    """Run a ppo/grpo `run_method(prompts, rollout, reference)` between two samplings of the
    held-out prompts (same seed): the reward before and after, the KL to the reference, and the
    judge's win rate of the trained policy's replies against the input model's."""

    def runner(ctx: StageContext, cfg: RLSettings, policy, tokenizer):
        reward = _reward(ctx, cfg)
        judge, judge_tok = _load_rm(ctx, "judge", cfg.judge, "judge")  # a wrong judge fails before training
        heldout, prompts = _prompts(ctx, cfg, tokenizer)
        rollout = _rollout_settings(ctx, cfg, reward)
        reference = copy.deepcopy(policy).requires_grad_(False).eval()
        seed = ctx.seed + 999_983  # not a training step's seed
        before = _heldout_replies(policy, reference, tokenizer, heldout, rollout, seed) if heldout else None
        trained, summary = run_method(ctx, cfg, policy, tokenizer, prompts, rollout, reference)
        if before is None:
            return trained, summary
        after = _heldout_replies(trained.cpu(), reference.cpu(), tokenizer, heldout, rollout, seed)
        summary.update({"heldout_reward_before": before["reward"], "heldout_reward": after["reward"],
                        "heldout_kl": after["kl"], "heldout_prompts": float(len(heldout)),
                        # a reward model that pays for length is hacked by growing replies: show it
                        "heldout_reply_tokens_before": before["tokens"], "heldout_reply_tokens": after["tokens"]})
        for when, replies in (("_before", before["texts"]), ("", after["texts"])):
            summary.update(_language_consistency(heldout, replies, when))
        if judge is not None:
            from llm_lifecycle.workflows.rl.judge import win_rate
            from llm_lifecycle.workflows.rl.rewards import messages_of

            judged = win_rate(judge, judge_tok, [messages_of(p) for p in heldout], after["texts"], before["texts"],
                              _system_prompt(ctx))
            summary.update({"heldout_win_rate": judged["win_rate"], "heldout_judge_score_before": judged["judge_score_b"],
                            "heldout_judge_score": judged["judge_score_a"]})
        return trained, summary

    return runner


def _rollout_flops(policy, settings: TrainSettings) -> float:
    # Per trained token: the update (6N) plus sampling and the reference pass (~2N each).
    return policy.cfg.flops_per_token(settings.seq_len) * 5 / 3


def run_grpo(ctx: StageContext, cfg: RLSettings, policy, tokenizer, prompts, rollout, reference):
    from llm_lifecycle.workflows.rl.policy_opt import grpo_batches, grpo_loss, pad_id_of

    settings = _train_settings(cfg, grad_accum=1)
    batches = grpo_batches(policy, reference, tokenizer, prompts, settings.batch_size, rollout, ctx.seed,
                           pad_id_of(tokenizer))
    summary = train(
        ctx, policy, settings, batches, grpo_loss(cfg.kl_coef),
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=_rollout_flops(policy, settings),
        description="grpo",
    )
    return policy, summary


def run_ppo(ctx: StageContext, cfg: RLSettings, policy, tokenizer, prompts, rollout, reference):
    from llm_lifecycle.workflows.rl.policy_opt import ActorCritic, pad_id_of, ppo_batches, ppo_loss

    settings = _train_settings(cfg, grad_accum=1)
    model = ActorCritic(policy)
    batches = ppo_batches(model, reference, tokenizer, prompts, settings.batch_size, rollout, ctx.seed,
                          pad_id_of(tokenizer), cfg.kl_coef, cfg.ppo_epochs, cfg.gamma, cfg.gae_lambda)
    summary = train(
        ctx, model, settings, batches, ppo_loss(cfg.clip, cfg.vf_coef),
        ckpt_dir=ctx.stage_dir / "checkpoints",
        flops_per_token=_rollout_flops(policy, settings) * 2,  # + the critic
        description="ppo",
    )
    return model.policy, summary


def _rs_problems(ctx: StageContext, cfg: RLSettings) -> list[dict]:
    """The first `rs_prompts` problems past each file's held-out ones (`heldout_split`)."""
    where = f"stages.{ctx.stage}.problems"
    problems = [p for uri in cfg.problems
                for p in heldout_split(read_data_files([uri], where, load_problems), cfg.heldout_prompts)[1]]
    if not problems:
        raise UserError(f"{where}: no problem left after the first heldout_prompts={cfg.heldout_prompts} of each "
                        "file; add problems or lower heldout_prompts")
    return problems[: cfg.rs_prompts]


def run_rs_sft(ctx: StageContext, cfg: RLSettings, policy, tokenizer):
    """Sample `group_size` answers for each of `rs_prompts` problems, keep one correct,
    well-formed answer per problem, and fine-tune on those (assistant-only loss)."""
    from llm_lifecycle.workflows.rl.rejection import correct_answers, fine_tune_on

    rollout = _rollout_settings(ctx, cfg)
    problems = _rs_problems(ctx, cfg)
    kept = correct_answers(ctx, policy, tokenizer, problems, rollout)
    summary = fine_tune_on(ctx, policy, tokenizer, _train_settings(cfg), kept, rollout.system_prompt)
    summary.update({"rs_kept": float(len(kept)), "rs_acceptance": len(kept) / len(problems)})
    return policy, summary


def run_iterative_dpo(ctx: StageContext, cfg: RLSettings, policy, tokenizer):
    from llm_lifecycle.workflows.rl.iterative_dpo import IterativeDPOSettings, iterative_dpo

    reward = _reward(ctx, cfg)
    heldout, train_prompts = _prompts(ctx, cfg, tokenizer)
    rounds = IterativeDPOSettings(rounds=cfg.rounds, prompts_per_round=cfg.prompts_per_round,
                                  rollout=_rollout_settings(ctx, cfg, reward), beta=cfg.beta, sft_weight=cfg.sft_weight)
    judge = _load_rm(ctx, "judge", cfg.judge, "judge")
    summary = iterative_dpo(ctx, policy, tokenizer, judge if judge[0] is not None else None, train_prompts, heldout,
                            _train_settings(cfg), rounds)
    return policy, summary


RUNNERS = {"dpo": run_dpo, "rm": run_rm, "ppo": _measured(run_ppo), "grpo": _measured(run_grpo), "rs-sft": run_rs_sft,
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
                                   extra={**model_provenance(ctx), "method": method})
        # The policy is unchanged: later stages keep evaluating and exporting the SFT model. The
        # stage named after its kind registers its reward model as @rm (not @rl, the policies'
        # alias); a named instance (a graph's several reward models) under its own name.
        return StageResult(outputs={"model": str(sft_dir), "reward_model": str(rm_dir)}, metrics=summary,
                           model_dir=str(rm_dir), model_alias="rm" if ctx.stage == ctx.kind else None)
    if before:
        after = heldout_answer_accuracy(ctx, cfg, trained.cpu(), tokenizer, _system_prompt(ctx))
        summary.update({"heldout_accuracy_before": before["accuracy"], "heldout_accuracy": after["accuracy"],
                        "heldout_format_rate": after["format_rate"]})
    model_dir = save_stage_model(ctx, trained, tokenizer, extra={"method": method})
    return StageResult(outputs={"model": str(model_dir)}, metrics=summary, model_dir=str(model_dir),
                       aliases=[method])


# Reward models and the judge come only from `from:` (never the nearest earlier model) and pass
# nothing on: the policy's sequence length and system prompt are what flow.
KIND = StageKind("rl", RLSettings, run, inputs=(
    Port("model", "model", unless="init"),
    Port("reward_model", "model", required=False, default=False, passes=False, needs="reward_model"),
    Port("safety_model", "model", required=False, default=False, passes=False, needs="reward_model"),
    Port("judge", "model", required=False, default=False, passes=False, needs="reward_model"),
), output="model", trains=True)
