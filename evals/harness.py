"""lm-eval adapter: our models as an `lm_eval` LM, and the MMLU / GSM8K / C-Eval suites.

`LifecycleLM` answers lm-eval's three request types with a plain forward pass (scoring) and
`models.generate.generate` (generation). `load_suite` builds lm-eval's own task definitions
with their data, read from the hub (lm-eval's default) or from local files in the official
layouts (see local_data.py), so missing data shows before anything runs; `evaluate_suite`
runs them through `lm_eval.simple_evaluate` and flattens the scores into
`eval.<task>.<metric>` for MLflow.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from lm_eval.api.model import LM

from llm_lifecycle.evals.local_data import (
    BENCHMARKS,
    BUILTIN_DATA_DIR,
    EvalError,
    build_mirror,
    resolve_data_dir,
)

__all__ = [
    "BUILTIN_DATA_DIR",
    "DEFAULT_FEWSHOT",
    "SUITES",
    "EvalError",
    "EvalReport",
    "LifecycleLM",
    "SuiteTasks",
    "evaluate_suite",
    "load_suite",
    "score_rows",
]

# Suite name (as on the command line) -> lm-eval task or group names.
SUITES = {"mmlu": ["mmlu"], "gsm8k": ["gsm8k"], "ceval": ["ceval-valid"], "cmmlu": ["cmmlu"]}
DEFAULT_FEWSHOT = {"mmlu": 5, "gsm8k": 5, "ceval": 5, "cmmlu": 5}


@dataclass(frozen=True)
class SuiteScore:
    """One aggregate score lm-eval reports for a whole suite, as `flat_metrics` names it."""

    task: str  # the lm-eval group or task that carries the aggregate
    metric: str
    filter: str  # lm-eval's filter ("none", "strict-match", ...)
    label: str  # what a summary calls it

    @property
    def key(self) -> str:
        return f"eval.{self.task}.{_flat_name(self.metric, self.filter)}"

    @property
    def stderr_key(self) -> str:
        return f"eval.{self.task}.{_flat_name(self.metric + '_stderr', self.filter)}"


# Per suite, its aggregate scores; the first is the suite's one headline score.
SUITE_SCORES = {
    "mmlu": [SuiteScore("mmlu", "acc", "none", "acc")],
    "gsm8k": [SuiteScore("gsm8k", "exact_match", "strict-match", "exact match (strict)"),
              SuiteScore("gsm8k", "exact_match", "flexible-extract", "exact match (flexible)")],
    "ceval": [SuiteScore("ceval-valid", "acc", "none", "acc")],
    "cmmlu": [SuiteScore("cmmlu", "acc", "none", "acc")],
}
# Where lm-eval keeps each suite's YAML; indexing only these takes 0.1 s instead of ~15 s for all tasks.
_TASK_DIRS = {"mmlu": "mmlu/default", "gsm8k": "gsm8k", "ceval": "ceval", "cmmlu": "cmmlu"}
_EOT = "<|endoftext|>"
log = logging.getLogger(__name__)


class LifecycleLM(LM):
    """One of our decoders (`model(ids).logits` -> [B, T, V]) with a `tokenizers.Tokenizer`.

    `progress`: the caller's progress display (the stage contract's `Progress`: `task(description,
    total)` yielding something with `advance(n)`); None shows nothing. `thinking` ("think" or
    "no_think") ends the last user turn of chat-templated prompts with Qwen3's soft switch;
    `thinking_budget` caps each generated answer's thinking (models/generate.py).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        batch_size: int = 8,
        max_length: int | None = None,
        device: str = "cpu",
        max_gen_toks: int = 256,
        progress=None,
        thinking: str = "",
        thinking_budget: int = 0,
        system_prompt: str | None = None,
    ):
        super().__init__()
        from llm_lifecycle.models.generate import thinking_budget as budget_steer

        budget_steer(tokenizer, thinking_budget)  # a bad budget or a tokenizer without <think> fails here
        self.progress = progress
        self.thinking, self.thinking_budget = thinking, thinking_budget
        self.system_prompt = system_prompt  # chat prompts without a system turn get the fine-tuning one
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self._device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length or _context_length(model)
        self.max_gen_toks = max_gen_toks
        eot = tokenizer.token_to_id(_EOT)
        if eot is None:
            raise ValueError(f"tokenizer has no {_EOT} token (docs/CONTRACTS.md: every tokenizer we use has one)")
        self.eot_token_id = eot
        # Added special tokens that may appear as stop strings ("<|im_end|>"): stop on their ids.
        self._special_ids = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    # --- tokenization -------------------------------------------------------------------

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's convention: the continuation's tokens are those of encode(context + continuation)
        after encode(context), with the context's trailing whitespace moved to the continuation
        (so " A" is scored as the one token a BPE makes of it)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not context:  # nothing to condition on: the document-start token stands in
            return [self.eot_token_id], self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        return context_ids, whole[len(context_ids):]

    # --- chat template (--apply-chat-template) --------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return "llm-lifecycle-chatml"

    def chat_template(self, chat_template: bool | str = False) -> str:
        from llm_lifecycle.models.hf import chatml_template

        return chatml_template(self.system_prompt)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """ChatML, the template our SFT stage trains with and our Hugging Face export ships."""
        from jinja2 import Template

        from llm_lifecycle.models.chat_markup import with_thinking_flag

        messages = with_thinking_flag(chat_history, self.thinking)
        return Template(self.chat_template()).render(messages=messages, add_generation_prompt=add_generation_prompt)

    # --- lm-eval request types -----------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        sequences = []
        for context, continuation in (r.args for r in requests):
            context_ids, continuation_ids = self._encode_pair(context, continuation)
            if len(continuation_ids) > self.max_length:
                raise ValueError(
                    f"continuation of {len(continuation_ids)} tokens exceeds max_length={self.max_length}"
                )
            sequences.append(((context_ids + continuation_ids)[-(self.max_length + 1):], len(continuation_ids)))
        results = self._score(sequences, disable_tqdm)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in lm-eval's disjoint windows of max_length tokens
        (every token predicted once, the first one after the document-start token)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        sequences, owner = [], []
        for doc, (text,) in enumerate(r.args for r in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.eot_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context_ids, predicted_ids in map(make_disjoint_window, windows):
                sequences.append((context_ids + predicted_ids, len(predicted_ids)))
                owner.append(doc)
        totals = [0.0] * len(requests)
        for doc, (logprob, _) in zip(owner, self._score(sequences, disable_tqdm)):
            totals[doc] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate (greedy unless do_sample) up to max_gen_toks, stopping early at <|endoftext|> or a
        special-token stop string, then cut the text at the first stop string."""
        from llm_lifecycle.models.generate import generate, thinking_budget

        # Requests with the same generation settings are batched together.
        by_settings = defaultdict(list)
        for i, request in enumerate(requests):
            by_settings[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        outputs = [""] * len(requests)
        for indices in by_settings.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            if max_new > self.max_length // 2:
                # A short-context model cannot take a 256-token answer after its prompt: keep half for the prompt.
                log.warning("max_gen_toks=%d lowered to %d (max_length=%d)", max_new, self.max_length // 2,
                            self.max_length)
                max_new = self.max_length // 2
            do_sample = bool(kwargs.get("do_sample", False))
            temperature = float(kwargs.get("temperature", 1.0)) if do_sample else 0.0
            top_p = float(kwargs.get("top_p", 1.0)) if do_sample else 1.0
            stop_ids = {self.eot_token_id} | {self._special_ids[s] for s in until if s in self._special_ids}

            prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            with self._task("generate", len(order), disable_tqdm) as bar:
                for start in range(0, len(order), self.batch_size):
                    batch = order[start : start + self.batch_size]
                    new_tokens = generate(
                        self.model,
                        [prompts[i] for i in batch],
                        max_new_tokens=max_new,
                        temperature=temperature,
                        top_p=top_p,
                        stop_ids=tuple(stop_ids),
                        steer=thinking_budget(self.tokenizer, self.thinking_budget),
                    )
                    for i, ids in zip(batch, new_tokens):
                        outputs[i] = _cut_at_stop(self.tok_decode(ids), until)
                        self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
                    bar.advance(len(batch))
        return outputs

    def _task(self, description: str, total: int, disable: bool):
        if self.progress is None or disable:
            return nullcontext(_NO_BAR)
        return self.progress.task(description, total=total)

    # --- scoring -------------------------------------------------------------------------

    @torch.no_grad()
    def _score(self, sequences: list[tuple[list[int], int]], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log-probs, all greedy) of the last n tokens of each sequence given the ones before.

        Sequences are grouped by context. A context whose continuations fit in one model input
        (the four one-token answer letters of MMLU) costs one row of a length-sorted batch; a
        context with several longer continuations is encoded once into the KV cache, and only
        the continuations run per choice.
        """
        results: list[tuple[float, bool] | None] = [(0.0, True) if n == 0 else None for _, n in sequences]
        groups = _plan_groups(sequences, [i for i, result in enumerate(results) if result is None])
        # The cache pays off when a context (at least 2 tokens: one to cache, one to start the rows) has 2+ rows.
        shared = [(context, rows) for context, rows in groups if len(rows) > 1 and len(context) >= 2]
        single = [row for context, rows in groups if not (len(rows) > 1 and len(context) >= 2) for row in rows]
        single.sort(key=lambda r: -len(r[0]))  # longest first: batch widths shrink, an OOM shows at once
        shared.sort(key=lambda g: -len(g[0]))
        with self._task("score", len(single) + sum(len(rows) for _, rows in shared), disable_tqdm) as bar:
            for start in range(0, len(single), self.batch_size):
                batch = single[start : start + self.batch_size]
                logits = self.model(_right_padded([inp for inp, _ in batch], self.eot_token_id, self._device)).logits
                for row, (inp, readers) in enumerate(batch):
                    for i in readers:
                        tokens, n = sequences[i]
                        results[i] = _read(logits[row, len(tokens) - 1 - n : len(tokens) - 1], tokens[-n:])
                bar.advance(len(batch))
            for batch in _fill_batches(shared, self.batch_size):
                self._score_shared(batch, sequences, results)
                bar.advance(sum(len(rows) for _, rows in batch))
        return results

    def _score_shared(self, groups, sequences, results) -> None:
        """Contexts encoded once (left-padded, batched) into a KV cache, copied to each of their
        continuation rows, which then run as one right-padded batch after the cache."""
        from llm_lifecycle.models.decoder import KVCache

        contexts = [context[:-1] for context, _ in groups]  # the last context token starts each row
        width = max(map(len, contexts))
        ids = torch.full((len(contexts), width), self.eot_token_id, dtype=torch.long)
        real = torch.zeros((len(contexts), width), dtype=torch.bool)
        for g, context in enumerate(contexts):
            ids[g, width - len(context) :] = torch.tensor(context)
            real[g, width - len(context) :] = True
        real = real.to(self._device)
        # Each token keeps its unpadded position (what position-dependent scalings such as LogN see).
        positions = (real.cumsum(-1) - 1).clamp(min=0)
        cache = self.model.new_kv_cache(key_padding=None if bool(real.all()) else real)
        self.model(ids.to(self._device), kv_cache=cache, position_ids=positions)

        owner = torch.tensor([g for g, (_, rows) in enumerate(groups) for _ in rows], device=self._device)
        rows = [(inp[len(context) - 1 :], readers) for context, group_rows in groups for inp, readers in group_rows]
        row_ids = _right_padded([inp for inp, _ in rows], self.eot_token_id, self._device)
        start = torch.tensor([len(contexts[g]) for g in owner.tolist()], device=self._device)
        per_row = KVCache(len(cache.keys), None if cache.key_padding is None else cache.key_padding[owner])
        per_row.keys = [k[owner] for k in cache.keys]
        per_row.values = [v[owner] for v in cache.values]
        logits = self.model(row_ids, kv_cache=per_row,
                            position_ids=start[:, None] + torch.arange(row_ids.size(1), device=self._device)).logits
        for row, (_, readers) in enumerate(rows):
            for i in readers:
                tokens, n = sequences[i]
                results[i] = _read(logits[row, :n], tokens[-n:])


class _NoBar:
    def advance(self, n: float = 1) -> None:
        pass


_NO_BAR = _NoBar()


def _right_padded(inputs: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """Right padding cannot change earlier positions of a causal model."""
    ids = torch.full((len(inputs), max(map(len, inputs))), pad_id, dtype=torch.long)
    for row, inp in enumerate(inputs):
        ids[row, : len(inp)] = torch.tensor(inp)
    return ids.to(device)


def _read(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    """(log p(targets), whether each target is the argmax) from the logits that predict them."""
    logprobs = logits.float().log_softmax(-1)
    target = torch.tensor(targets, device=logprobs.device)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def _plan_groups(sequences: list[tuple[list[int], int]], todo: list[int]):
    """[(context tokens, [(model input, readers)])]: the inputs to run per shared context.

    A causal model's logits at a position depend only on the tokens up to it, so a sequence
    whose input is a prefix of another's input (same context) reads that row: the four answer
    letters of a multiple-choice question, or a repeated request, cost one row.
    """
    by_context = defaultdict(list)
    for i in todo:
        tokens, n = sequences[i]
        by_context[tuple(tokens[:-n])].append(i)
    groups = []
    for context, members in by_context.items():
        rows: list[tuple[list[int], list[int]]] = []
        for i in sorted(members, key=lambda i: -len(sequences[i][0])):
            inp = sequences[i][0][:-1]
            row = next((r for r in rows if r[0][: len(inp)] == inp), None)
            if row is None:
                rows.append((inp, [i]))
            else:
                row[1].append(i)
        groups.append((list(context), rows))
    return groups


def _fill_batches(groups, batch_size: int):
    """Consecutive groups until their continuation rows reach batch_size (a big group goes alone)."""
    batch, n_rows = [], 0
    for group in groups:
        if batch and n_rows + len(group[1]) > batch_size:
            yield batch
            batch, n_rows = [], 0
        batch.append(group)
        n_rows += len(group[1])
    if batch:
        yield batch


def _context_length(model: torch.nn.Module) -> int:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    length = getattr(cfg, "max_seq_len", None)
    if not length:
        raise ValueError("give max_length: the model's config does not say its context length")
    return int(length)


def _cut_at_stop(text: str, until: list[str]) -> str:
    cut = min((text.find(s) for s in until if s and s in text), default=len(text))
    return text[:cut]


# --- suites --------------------------------------------------------------------------------


@dataclass
class EvalReport:
    suite: str
    metrics: dict[str, float]  # "eval.<task>.<metric>" for the suite and each subtask
    results: dict  # lm-eval's results, JSON-serialisable (log it as an artifact)
    versions: dict[str, float | str]  # lm-eval task/group versions
    n_samples: dict[str, int]  # per evaluated task: documents scored
    num_fewshot: int
    data: dict  # source ("hub" | "local" | "builtin"), where, the splits used, notes

    @property
    def num_samples(self) -> int:
        return sum(self.n_samples.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "num_samples": self.num_samples}


@dataclass
class SuiteTasks:
    """A suite's lm-eval tasks, built with their data in memory: what `evaluate_suite` runs."""

    suite: str
    tasks: list
    task_manager: object
    data: dict  # source ("hub" | "local" | "builtin"), where, the splits used, notes


def load_suite(suite: str, data_dir: str | Path | None = None, num_fewshot: int | None = None) -> SuiteTasks:
    """Find a suite's data and build its tasks; raises EvalError (a ValueError) for an unknown
    suite or data that cannot be had (missing files, no hub offline).

    data_dir: None -> lm-eval reads the hub datasets; a folder -> the official layouts under it
    (local_data.py); "builtin" -> the shipped MIT mirror. Local data must hold `num_fewshot`
    (default: the suite's) few-shot examples per subject.
    """
    if suite not in SUITES:
        raise EvalError(f"unknown eval suite {suite!r}; choose from {', '.join(SUITES)}")
    root = resolve_data_dir(data_dir)
    with tempfile.TemporaryDirectory(prefix="llm-eval-") as tmp:  # the converted files, read while building
        task_manager, data = _task_manager(suite, root, Path(tmp), _fewshot(suite, num_fewshot))
        tasks = _load_tasks(task_manager, suite, data)
    return SuiteTasks(suite, tasks, task_manager, data)


def evaluate_suite(
    lm: LM,
    suite: str | SuiteTasks,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    log_samples: bool = False,
    apply_chat_template: bool = False,
) -> EvalReport:
    """Run one suite with lm-eval's own task definitions.

    lm: our LifecycleLM, or any lm-eval LM (its `hf` and `vllm` backends on an exported folder).
    suite: a suite name, whose data `load_suite` finds in data_dir, or what `load_suite` returned.
    limit: documents per task (per subject for MMLU and C-Eval). apply_chat_template: prompts
    (few-shot turns included) in the model's chat template. Raises EvalError (a ValueError)
    for an unknown suite or missing data.
    """
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    if limit is not None and limit < 1:
        raise EvalError(f"limit must be a positive number of examples, got {limit}")
    loaded = suite if isinstance(suite, SuiteTasks) else load_suite(suite, data_dir, num_fewshot)
    if batch_size and isinstance(lm, LifecycleLM):
        lm.batch_size = batch_size
    fewshot = _fewshot(loaded.suite, num_fewshot)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=loaded.tasks,
        num_fewshot=fewshot,
        limit=limit,
        batch_size=lm.batch_size,
        task_manager=loaded.task_manager,
        log_samples=log_samples,
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=apply_chat_template,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    results = json.loads(json.dumps(results, default=handle_non_serializable))
    return EvalReport(
        suite=loaded.suite,
        metrics=flat_metrics(results),
        results=results,
        versions=results.get("versions", {}),
        n_samples={task: int(n["effective"]) for task, n in results.get("n-samples", {}).items()},
        num_fewshot=fewshot,
        data=loaded.data,
    )


def flat_metrics(results: dict) -> dict[str, float]:
    """lm-eval's {"task": {"acc,none": x, "exact_match,strict-match": y}} -> {"eval.task.acc": x,
    "eval.task.exact_match_strict-match": y}; stderr kept, non-numbers (N/A) and NaN dropped."""
    flat = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            metric, filter_name = key.split(",", 1)
            flat[f"eval.{task}.{_flat_name(metric, filter_name)}"] = float(value)
    return flat


def _flat_name(metric: str, filter_name: str) -> str:
    return metric if filter_name == "none" else f"{metric}_{filter_name}"


def score_rows(report: EvalReport) -> list[dict]:
    """One row per lm-eval group then task: {"task", "group" (bool), "n", metric: value}; stderrs left out."""
    groups = set(report.results.get("groups", {}))
    rows = []
    for task in sorted(report.results["results"], key=lambda t: (t not in groups, t)):
        values = {k: v for k, v in flat_metrics({"results": {task: report.results["results"][task]}}).items()
                  if "_stderr" not in k}
        rows.append({"task": task, "group": task in groups, "n": report.n_samples.get(task),
                     **{k.split(".", 2)[2]: v for k, v in values.items()}})
    return rows


def _fewshot(suite: str, num_fewshot: int | None) -> int:
    fewshot = DEFAULT_FEWSHOT[suite] if num_fewshot is None else num_fewshot
    if fewshot < 0:
        raise EvalError(f"num_fewshot must be 0 or more examples, got {fewshot}")
    return fewshot


def _task_manager(suite: str, root: Path | None, work_dir: Path, fewshot: int):
    """A TaskManager that knows only this suite's tasks; with local data, each leaf task is
    overridden (a YAML that includes lm-eval's own) to read its converted subject file."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    task_dir = Path(lm_eval.tasks.__file__).parent / _TASK_DIRS[suite]
    stock = TaskManager(include_defaults=False, include_path=[task_dir])
    if root is None:
        return stock, {"source": "hub", "where": BENCHMARKS[suite].hub_dataset, "notes": []}
    if not root.is_dir():
        raise EvalError(
            f"{suite}: data folder {root} does not exist; expected {BENCHMARKS[suite].layout} under it "
            "(or --data-dir builtin, or no --data-dir to read the hub)"
        )
    leaves = _leaf_tasks(stock.task_index, SUITES[suite])
    mirror = build_mirror(suite, root, sorted(set(leaves.values())), work_dir / "data", fewshot)
    override_dir = work_dir / "tasks"
    override_dir.mkdir()
    (override_dir / "mirror_loader.py").write_text("from llm_lifecycle.evals.local_data import load_config\n")
    for name, subject in leaves.items():
        lines = [f"include: {json.dumps(str(stock.task_index[name].yaml_path))}",
                 "custom_dataset: !function mirror_loader.load_config",
                 f"dataset_kwargs: {json.dumps({'file': str(mirror.path / f'{subject}.json')})}"]
        lines += [f"{key}: {json.dumps(value)}" for key, value in mirror.task_overrides.items()]
        (override_dir / f"{name}.yaml").write_text("\n".join(lines) + "\n")  # JSON scalars are YAML
    source = "builtin" if root.resolve() == BUILTIN_DATA_DIR.resolve() else "local"
    data = {"source": source, "where": str(root / suite), "splits": mirror.splits, "notes": mirror.notes}
    return TaskManager(include_defaults=False, include_path=[task_dir, override_dir]), data


def _leaf_tasks(index: dict, names: list[str]) -> dict[str, str]:
    """{leaf task name: the hub config (MMLU/C-Eval subject, GSM8K 'main') it reads} under `names`."""
    from lm_eval.tasks._index import Kind

    found = {}
    for name in names:
        entry = index[name]
        if entry.kind == Kind.GROUP:
            children = [c if isinstance(c, str) else c.get("task") or c.get("group") for c in entry.cfg["task"]]
            found |= _leaf_tasks(index, children)
        elif entry.kind == Kind.TAG:
            found |= _leaf_tasks(index, sorted(entry.tags))
        elif entry.cfg.get("dataset_name"):
            found[name] = entry.cfg["dataset_name"]
    return found


def _load_tasks(task_manager, suite: str, data: dict) -> list:
    """Build the suite's task objects now, so a missing dataset is reported as such."""
    try:
        loaded = task_manager.load(SUITES[suite])
    except OSError as err:  # ConnectionError offline, DatasetNotFoundError (a FileNotFoundError)
        if data["source"] != "hub":
            raise
        raise EvalError(
            f"{suite}: could not load {data['where']} from the Hugging Face hub ({err}); "
            f"give --data-dir DIR holding {BENCHMARKS[suite].layout}, "
            "or --data-dir builtin for the shipped MIT mirror (MMLU dev/val, a GSM8K train slice)"
        ) from err
    tasks = [loaded["groups"].get(name) or loaded["tasks"][name] for name in SUITES[suite]]
    if data["source"] == "hub":
        config = next(iter(loaded["tasks"].values())).config
        data["splits"] = {"eval": config.test_split or config.validation_split, "fewshot": config.fewshot_split}
    return tasks
