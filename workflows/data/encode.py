"""Parallel encoding of a documents jsonl file into token parts for `shards.write_parts`.

The file is cut into parts of about `part_bytes` of lines; worker processes parse and
encode whole parts (one Rust thread each: the processes are the parallelism, and they also
spread the Python work of parsing JSON and packing ids, which a threaded `encode_batch`
leaves on one core). Parts come back in file order, so the shards are byte-identical for any
number of workers.

This module imports only numpy and tokenizers, so that spawned workers start quickly.
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np

_worker: dict = {}


def _init(tokenizer_path: str, eot_id: int) -> None:
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; read at every call
    _worker.update(tokenizer=Tokenizer.from_file(tokenizer_path), eot_id=eot_id)


def encode_lines(lines: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Encode jsonl lines ({"text": ...}) into one part (shards.Part): the token ids end to
    end, each document followed by end-of-text, and each document's length."""
    tokenizer, eot_id = _worker["tokenizer"], _worker["eot_id"]
    encodings = tokenizer.encode_batch([json.loads(line)["text"] for line in lines])
    tokens: list[int] = []
    lengths = np.empty(len(encodings), dtype=np.int64)
    for i, encoding in enumerate(encodings):
        ids = encoding.ids  # a new Python list at every access: take it once
        tokens += ids
        tokens.append(eot_id)
        lengths[i] = len(ids) + 1
    return np.array(tokens, dtype=np.uint32), lengths


def line_parts(path: str | Path, part_bytes: int) -> Iterator[list[bytes]]:
    """The non-empty lines of `path` in groups of about `part_bytes`."""
    part: list[bytes] = []
    size = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            part.append(line)
            size += len(line)
            if size >= part_bytes:
                yield part
                part, size = [], 0
    if part:
        yield part


def encode_file(
    tokenizer_path: str | Path, eot_id: int, path: str | Path, workers: int = 1, part_bytes: int = 1 << 20
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Token parts of every document of the jsonl file `path`, in file order, encoded by
    `workers` worker processes with at most two parts in flight per worker."""
    parts = line_parts(path, part_bytes)
    context = get_context("spawn")  # fork would copy the tokenizer's thread pool and the parent's torch
    # Workers read the tokenizer from its file: starting a spawned worker blocks the parent
    # until the worker has read its pickled arguments, so a tokenizer passed as a JSON string
    # (200 kB at 8,192 tokens) made the workers start one after the other.
    initargs = (str(tokenizer_path), eot_id)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init, initargs=initargs) as pool:
        pending: deque = deque()
        for part in parts:
            pending.append(pool.submit(encode_lines, part))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
