"""Passkey retrieval: can the model read a number back from far up its context?

The probe of the position-interpolation and LongLoRA papers: filler text fills a window of
`seq_len` tokens, a line "The pass key is 6 8 2 1 9. Remember it." sits at some depth, and the
window ends with "What is the pass key? The pass key is". Scored teacher-forced: a trial is
retrieved when the model's top token is the right digit at every digit of the key; the mean
log-probability of the key's tokens is reported too, since small models rarely get it all.
"""

from __future__ import annotations

import random

import torch


@torch.no_grad()
def passkey_retrieval(model: torch.nn.Module, encode, filler: list[int], seq_len: int, trials: int = 8,
                      digits: int = 5, seed: int = 0) -> dict[str, float]:
    """`encode(text) -> token ids`; `filler` is natural text (token ids) to pad with.

    Returns {"accuracy": share of trials retrieved, "key_logprob": mean log p per key token}.
    """
    rng = random.Random(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits, logprob, key_tokens = 0, 0.0, 0
    for trial in range(trials):
        key = " ".join(str(rng.randrange(10)) for _ in range(digits))
        needle = encode(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n")
        question = encode("\nWhat is the pass key? The pass key is")
        answer = encode(f" {key}")
        room = seq_len - len(needle) - len(question) - len(answer)
        if room < 1 or len(filler) < room:
            raise ValueError(f"passkey: seq_len {seq_len} leaves no room for filler (or too little filler text)")
        depth = int(room * (trial + 0.5) / trials)  # spread the needle from the start to the end
        start = rng.randrange(len(filler) - room + 1)
        text = filler[start : start + depth] + needle + filler[start + depth : start + room] + question + answer
        ids = torch.tensor([text], device=device)
        logits = model(ids[:, :-1]).logits[0, -len(answer):].float()
        target = ids[0, -len(answer):]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
        hits += bool((logits.argmax(-1) == target).all())
        logprob += float(logp.sum())
        key_tokens += len(answer)
    model.train(was_training)
    return {"accuracy": hits / trials, "key_logprob": logprob / key_tokens}
