"""Evaluation layer: LifecycleLM against hand-computed log-probs, real lm-eval runs of MMLU,
GSM8K and C-Eval from local files in their official layouts, perplexity."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from conftest import official_layout, shakespeare  # noqa: E402
from llm_lifecycle.evals.harness import BUILTIN_DATA_DIR, EvalError, LifecycleLM, evaluate_suite  # noqa: E402
from llm_lifecycle.evals.perplexity import perplexity  # noqa: E402
from llm_lifecycle.models.config import ModelConfig  # noqa: E402
from llm_lifecycle.models.decoder import Decoder  # noqa: E402

MAX_LENGTH = 96


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = shakespeare(50_000)
    tok.train_from_iterator([text, "Question: Answer: A B C D 0 1 2 3 4 5 6 7 8 9"], trainer)
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.get_vocab_size(), dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64,
        max_seq_len=MAX_LENGTH,
    )
    return Decoder(cfg).eval()


def _lm(model, tokenizer, **kw) -> LifecycleLM:
    lm = LifecycleLM(model, tokenizer, **kw)
    assert lm.max_length == kw.get("max_length", MAX_LENGTH)  # defaults to the model's context length
    return lm


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def _hand_logprob(model, context_ids: list[int], target_ids: list[int]) -> float:
    """log p(targets | context) from one unbatched forward pass."""
    ids = torch.tensor([context_ids + target_ids[:-1]])
    logprobs = model(ids).logits[0].log_softmax(-1)[-len(target_ids):]
    return float(logprobs[torch.arange(len(target_ids)), torch.tensor(target_ids)].sum())


# --- LifecycleLM --------------------------------------------------------------------------


def test_loglikelihood_matches_hand_computed_log_softmax(model, tokenizer):
    lm = _lm(model, tokenizer, batch_size=3)
    context, continuation = "To be, or not to be: that is the ", "question"
    # lm-eval's convention: the context's trailing space joins the continuation.
    ctx_ids = tokenizer.encode(context.rstrip()).ids
    cont_ids = tokenizer.encode(context + continuation).ids[len(ctx_ids):]
    expected = _hand_logprob(model, ctx_ids, cont_ids)

    # Same context, inputs that are prefixes of one another: they share one forward row.
    args = [(context, continuation), ("Answer:", " B"), (context, continuation), ("", "whole text"),
            ("Answer:", " C"), ("Answer:", " B and more")]
    batched = lm.loglikelihood(_requests("loglikelihood", args))
    assert batched[0][0] == pytest.approx(expected, abs=1e-4)
    assert batched[2] == batched[0]  # a repeated request gives the same answer
    # Batching, padding and input sharing change nothing: same as one request at a time.
    one_by_one = _lm(model, tokenizer, batch_size=1)
    for arg, got in zip(args, batched):
        ref = one_by_one.loglikelihood(_requests("loglikelihood", [arg]))[0]
        assert got[0] == pytest.approx(ref[0], abs=1e-4) and got[1] == ref[1]
    # An empty context conditions on the document-start token.
    eot = tokenizer.token_to_id("<|endoftext|>")
    assert batched[3][0] == pytest.approx(_hand_logprob(model, [eot], tokenizer.encode("whole text").ids), abs=1e-4)


def test_shared_contexts_run_once_through_the_kv_cache(model, tokenizer):
    """Contexts of different lengths, each with several multi-token continuations (a HellaSwag
    shape): the cached path gives what one-request-at-a-time scoring gives."""
    contexts = ["To be, or not to be", "Now is the winter of our discontent made glorious summer", "Friends,"]
    endings = [" that is the question", " a tale told by an idiot", " to sleep", " perchance to dream, ay"]
    args = [(c, e) for c in contexts for e in endings]
    batched = _lm(model, tokenizer, batch_size=6).loglikelihood(_requests("loglikelihood", args))
    one_by_one = _lm(model, tokenizer, batch_size=1)
    for arg, got in zip(args, batched):
        ref = one_by_one.loglikelihood(_requests("loglikelihood", [arg]))[0]
        assert got[0] == pytest.approx(ref[0], abs=1e-4) and got[1] == ref[1]
    ctx_ids = tokenizer.encode(contexts[1]).ids
    cont_ids = tokenizer.encode(contexts[1] + endings[0]).ids[len(ctx_ids):]
    assert batched[4][0] == pytest.approx(_hand_logprob(model, ctx_ids, cont_ids), abs=1e-4)


def test_loglikelihood_truncates_long_context_from_the_left(model, tokenizer):
    lm = _lm(model, tokenizer, max_length=16)
    context = "Now is the winter of our discontent made glorious summer by this sun of York"
    ids = tokenizer.encode(context + " and").ids
    n_cont = len(ids) - len(tokenizer.encode(context).ids)
    (logprob, _), = lm.loglikelihood(_requests("loglikelihood", [(context, " and")]))
    window = ids[-17:]
    assert logprob == pytest.approx(_hand_logprob(model, window[:-n_cont], window[-n_cont:]), abs=1e-4)


def test_rolling_loglikelihood_is_minus_the_nll(model, tokenizer):
    eot = tokenizer.token_to_id("<|endoftext|>")
    text = "Friends, Romans, countrymen, lend me your ears"
    ids = tokenizer.encode(text).ids
    # One window: every token predicted from the document-start token and the ones before it.
    (whole,) = _lm(model, tokenizer).loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert whole == pytest.approx(_hand_logprob(model, [eot], ids), abs=1e-4)

    # Windows of 4 over 10 tokens, as lm-eval's docstring draws them:
    # [eot 0 1 2] -> 0 1 2 3;  [3 4 5 6] -> 4 5 6 7;  [5 6 7 8] -> 8 9 (last two scored).
    ten = ids[:10]
    short = tokenizer.decode(ten)
    assert tokenizer.encode(short).ids == ten
    expected = (
        _hand_logprob(model, [eot], ten[:4])
        + _hand_logprob(model, ten[3:4], ten[4:8])
        + _hand_logprob(model, ten[5:8], ten[8:10])
    )
    (rolled,) = _lm(model, tokenizer, max_length=4).loglikelihood_rolling(
        _requests("loglikelihood_rolling", [(short,)])
    )
    assert rolled == pytest.approx(expected, abs=1e-4)


def test_generate_until_cuts_at_the_first_stop_string(model, tokenizer):
    lm = _lm(model, tokenizer, batch_size=2)
    prompts = ["Question: what light through yonder window breaks?\nAnswer:", "Answer:"]
    free = lm.generate_until(_requests("generate_until", [(p, {"until": [], "max_gen_toks": 16}) for p in prompts]))
    assert all(len(text) >= 8 for text in free)
    # Greedy decoding is deterministic, so with a stop string the same text comes back cut before it.
    stops = [text[4:7] for text in free]
    args = [(p, {"until": ["never-generated", stop], "max_gen_toks": 16, "do_sample": False})
            for p, stop in zip(prompts, stops)]
    cut = lm.generate_until(_requests("generate_until", args))
    assert cut == [text[: text.index(stop)] for text, stop in zip(free, stops)]
    assert all(len(c) <= 4 for c in cut)


# --- perplexity ---------------------------------------------------------------------------


def test_perplexity_is_exp_mean_nll_over_disjoint_windows(model, tokenizer):
    ids = tokenizer.encode(shakespeare(3000)).ids
    seq_len = 32
    nll, count = 0.0, 0
    for k in range(3):
        window = ids[k * seq_len : (k + 1) * seq_len]
        nll -= _hand_logprob(model, window[:1], window[1:])
        count += seq_len - 1
    expected = math.exp(nll / count)
    assert perplexity(model, ids, seq_len, batch_size=2, max_windows=3) == pytest.approx(expected, rel=1e-4)
    # A tensor works too; the tail shorter than a window is dropped.
    assert perplexity(model, torch.tensor(ids[: 3 * seq_len + 5]), seq_len) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="at least one window"):
        perplexity(model, ids[:10], seq_len)


# --- suites through lm_eval.simple_evaluate ------------------------------------------------


def _bench():
    """benches/eval_parity.py, whose backend comparison the tests share."""
    spec = importlib.util.spec_from_file_location("eval_parity", Path(__file__).parents[1] / "benches" / "eval_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Official layouts: shipped MMLU (val copied as test) and GSM8K rows, generated C-Eval questions."""
    return official_layout(tmp_path_factory.mktemp("bench"), gsm8k_test=20, gsm8k_train=50)


def _assert_scores(report, suite_metric: str, limit: int):
    assert suite_metric in report.metrics
    assert all(0.0 <= v <= 1.0 for v in report.metrics.values()), report.metrics
    assert report.n_samples and all(n == limit for n in report.n_samples.values())
    json.dumps(report.to_dict())  # loggable as an artifact


def test_mmlu_from_local_official_csvs(model, tokenizer, data_dir):
    report = evaluate_suite(_lm(model, tokenizer, batch_size=16), "mmlu", data_dir=data_dir, limit=2, num_fewshot=1)
    _assert_scores(report, "eval.mmlu.acc", limit=2)
    assert len(report.n_samples) == 57 and "eval.mmlu_abstract_algebra.acc" in report.metrics
    assert report.data["source"] == "local" and report.data["splits"] == {"eval": "test", "fewshot": "dev"}
    assert report.versions["mmlu"] is not None and report.num_fewshot == 1


def test_ceval_from_local_official_csvs(model, tokenizer, data_dir):
    report = evaluate_suite(_lm(model, tokenizer, batch_size=16), "ceval", data_dir=data_dir, limit=1, num_fewshot=1)
    _assert_scores(report, "eval.ceval-valid.acc", limit=1)
    assert len(report.n_samples) == 52 and "eval.ceval-valid_accountant.acc_norm" in report.metrics


def test_gsm8k_from_local_jsonl(model, tokenizer, data_dir):
    lm = _lm(model, tokenizer, batch_size=4, max_gen_toks=8)
    report = evaluate_suite(lm, "gsm8k", data_dir=data_dir, limit=3, num_fewshot=2, log_samples=True)
    _assert_scores(report, "eval.gsm8k.exact_match_strict-match", limit=3)
    assert "eval.gsm8k.exact_match_flexible-extract" in report.metrics
    assert {s["doc_id"] for s in report.results["samples"]["gsm8k"]} == {0, 1, 2}


def test_chat_template_wraps_prompts_and_fewshot_turns_in_chatml(model, tokenizer, data_dir):
    lm = _lm(model, tokenizer, batch_size=4, max_gen_toks=4)
    report = evaluate_suite(lm, "gsm8k", data_dir=data_dir, limit=1, num_fewshot=1, log_samples=True,
                            apply_chat_template=True)
    samples = report.results["samples"]["gsm8k"]  # one per answer filter, the same prompt
    prompt = samples[0]["arguments"][0][0]
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert prompt.count("<|im_start|>assistant\n") == 2  # the few-shot answer is its own assistant turn


def test_chat_prompts_open_with_the_models_fine_tuning_system_prompt(model, tokenizer, data_dir):
    lm = _lm(model, tokenizer, batch_size=4, max_gen_toks=4, system_prompt="Solve step by step.")
    report = evaluate_suite(lm, "gsm8k", data_dir=data_dir, limit=1, num_fewshot=0, log_samples=True,
                            apply_chat_template=True)
    prompt = report.results["samples"]["gsm8k"][0]["arguments"][0][0]
    assert prompt.startswith("<|im_start|>system\nSolve step by step.<|im_end|>\n<|im_start|>user\n")


def test_builtin_mirror_reports_what_its_splits_are(model, tokenizer):
    lm = _lm(model, tokenizer, batch_size=16)
    report = evaluate_suite(lm, "mmlu", data_dir="builtin", limit=1, num_fewshot=0)
    assert report.data["source"] == "builtin" and report.data["splits"]["eval"] == "val"
    assert any("val" in note for note in report.data["notes"])
    size = sum(f.stat().st_size for f in BUILTIN_DATA_DIR.rglob("*") if f.is_file())
    assert size < 2_000_000 and not (BUILTIN_DATA_DIR / "ceval").exists()


def test_missing_data_is_a_clear_error(model, tokenizer, tmp_path):
    lm = _lm(model, tokenizer)
    with pytest.raises(EvalError, match=r"gsm8k: missing .*test\.jsonl"):
        evaluate_suite(lm, "gsm8k", data_dir=tmp_path, limit=1)
    (tmp_path / "mmlu" / "dev").mkdir(parents=True)
    with pytest.raises(EvalError, match=r"mmlu: few-shot examples not found: missing .*abstract_algebra_dev\.csv"):
        evaluate_suite(lm, "mmlu", data_dir=tmp_path, limit=1)
    # No data folder and no hub (offline): say so, and what to do.
    with pytest.raises(EvalError, match=r"ceval: could not load ceval/ceval-exam .*--data-dir"):
        evaluate_suite(lm, "ceval", limit=1)
    with pytest.raises(EvalError, match="unknown eval suite"):
        evaluate_suite(lm, "hellaswag")


# --- parity with lm-eval's own `hf` backend -------------------------------------------------


def test_same_scores_as_lm_evals_hf_backend_on_the_exported_model(tokenizer, data_dir, tmp_path):
    """A random model exported with models/hf.py: LifecycleLM and HFLM (transformers on the folder)
    choose the same answers and score the same on mmlu, ceval-valid and gsm8k (the bench does
    this at limit 100 on a trained model)."""
    from llm_lifecycle.models.checkpoint import save_model_dir
    from llm_lifecycle.models.hf import export_hf

    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=64, max_seq_len=288)  # room for lm-eval's 256 generated tokens after a prompt
    save_model_dir(tmp_path / "model", Decoder(cfg), tokenizer)
    hf_dir = export_hf(tmp_path / "model", tmp_path / "hf")
    bench = _bench()
    for suite, limit in (("mmlu", 1), ("ceval", 1), ("gsm8k", 2)):
        row = bench.compare(tmp_path / "model", hf_dir, suite, data_dir, limit, batch_size=16, num_fewshot=1)
        for metric, ours in row["ours"].items():
            assert abs(ours - row["hf"][metric]) <= 0.005, (suite, metric, row)
        assert row["agreement"] >= 0.98, row  # the same answer chosen (or text generated), document by document
        if row["max_logprob_gap"] is not None:
            assert row["max_logprob_gap"] < 1e-3, row
    assert row["docs"] == 2 and row["ours"]["eval.gsm8k.exact_match_flexible-extract"] is not None
