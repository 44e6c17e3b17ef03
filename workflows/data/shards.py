"""Token shards: documents' token ids packed end to end into memory-mapped files.

A shard folder holds

    shard_00000.bin ...  raw little-endian token ids (uint16 when the vocabulary fits, else uint32)
    doc_offsets.npy      int64 start of every document in the token stream, then the total
    doc_groups.npy       uint16 mixture group of every document, named in groups.json
    index.json           dtype, vocabulary size, shards (file, tokens, sha1), totals, "complete"

`write_shards` is resumable: the index is rewritten after every shard, and a shard that an
earlier attempt completed (same content hash in the index, right file size) is not written
again. `TokenShards` reads a folder; its training batches are a pure function of
(seed, step), so a resumed run continues at exactly the data position it stopped at.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from llm_lifecycle.workflows.runner.stage import ProgressTask, UserError, atomic_path, write_json_atomic

INDEX_FILE = "index.json"
OFFSETS_FILE = "doc_offsets.npy"
GROUPS_FILE = "doc_groups.npy"  # each document's mixture group id
GROUP_NAMES_FILE = "groups.json"
FORMAT = "llm-lifecycle-tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding ids 0 .. vocab_size - 1."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.bin"


def read_index(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / INDEX_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _file_ok(directory: Path, entry: dict, itemsize: int) -> bool:
    path = directory / entry["file"]
    return path.is_file() and path.stat().st_size == entry["tokens"] * itemsize


def is_complete(directory: str | Path) -> bool:
    """True when `directory` holds a finished shard set whose files all have their sizes."""
    directory = Path(directory)
    index = read_index(directory)
    if not index or not index.get("complete"):
        return False
    itemsize = np.dtype(index["dtype"]).itemsize
    return (directory / OFFSETS_FILE).is_file() and all(_file_ok(directory, e, itemsize) for e in index["shards"])


@dataclass
class ShardStats:
    tokens: int
    documents: int
    shards: int
    written: int  # shards this call wrote; the others were already complete on disk


def _write_if_changed(path: Path, payload: bytes) -> None:
    if path.is_file() and path.read_bytes() == payload:
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


Part = tuple[np.ndarray, np.ndarray]  # (token ids of whole documents end to end, each document's length)


def write_shards(
    directory: str | Path,
    documents: Iterable[Sequence[int] | np.ndarray],
    vocab_size: int,
    shard_tokens: int = 1 << 20,
    task: ProgressTask | None = None,
) -> ShardStats:
    """Pack `documents` (token id sequences, each already ending in its end-of-text id)
    into shards of `shard_tokens` tokens under `directory`; `task` advances per document."""
    parts = ((np.asarray(doc), np.asarray([len(doc)], dtype=np.int64)) for doc in documents)
    return write_parts(directory, parts, vocab_size, shard_tokens, task)


def write_parts(
    directory: str | Path,
    parts: Iterable[Part],
    vocab_size: int,
    shard_tokens: int = 1 << 20,
    task: ProgressTask | None = None,
) -> ShardStats:
    """`write_shards` for documents that arrive encoded in parts of many documents (from
    the parallel encoder); `task` advances per document."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    header = {"format": FORMAT, "dtype": dtype.name, "vocab_size": vocab_size, "shard_tokens": shard_tokens}
    previous = read_index(directory) or {}
    same_layout = all(previous.get(k) == v for k, v in header.items())
    done_before = {e["file"]: e for e in previous.get("shards", [])} if same_layout else {}

    entries: list[dict[str, Any]] = []
    written = 0

    def flush(chunk: np.ndarray) -> None:
        nonlocal written
        entry = {
            "file": shard_name(len(entries)),
            "tokens": int(chunk.size),
            "sha1": hashlib.sha1(chunk.data).hexdigest(),
        }
        entries.append(entry)
        if done_before.get(entry["file"]) == entry and _file_ok(directory, entry, dtype.itemsize):
            return
        with atomic_path(directory / entry["file"]) as tmp:
            chunk.tofile(tmp)
        written += 1
        # Record progress, so that a run killed after this point does not write this shard again.
        write_json_atomic(directory / INDEX_FILE, {**header, "shards": entries, "complete": False})

    starts: list[np.ndarray] = []
    total = 0
    pending: list[np.ndarray] = []
    pending_tokens = 0
    for tokens, lengths in parts:
        if tokens.size and int(tokens.max()) >= vocab_size:
            raise ValueError(f"token id {int(tokens.max())} is outside the vocabulary of {vocab_size}")
        tokens = tokens.astype(dtype, copy=False)
        starts.append(total + np.cumsum(lengths) - lengths)
        total += tokens.size
        pending.append(tokens)
        pending_tokens += tokens.size
        if pending_tokens >= shard_tokens:
            stream = np.concatenate(pending)
            full = stream.size - stream.size % shard_tokens
            for start in range(0, full, shard_tokens):
                flush(stream[start : start + shard_tokens])
            rest = stream[full:]
            pending, pending_tokens = ([rest] if rest.size else []), rest.size
        if task is not None:
            task.advance(len(lengths))
    if pending_tokens:
        flush(np.concatenate(pending))

    documents = sum(len(s) for s in starts)
    offsets = io.BytesIO()
    np.save(offsets, np.concatenate([*starts, [total]]).astype(np.int64))
    _write_if_changed(directory / OFFSETS_FILE, offsets.getvalue())
    index = {
        **header,
        "shards": entries,
        "complete": True,
        "tokens": total,
        "documents": documents,
        "doc_offsets": OFFSETS_FILE,
    }
    _write_if_changed(directory / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True).encode())
    for stale in set(directory.glob("shard_*.bin")) - {directory / e["file"] for e in entries}:
        stale.unlink()  # left by an earlier, longer attempt with other settings
    return ShardStats(tokens=total, documents=documents, shards=len(entries), written=written)


def write_groups(directory: str | Path, groups: list[str]) -> None:
    """Record each document's mixture group (data-fetch's `group`), for mixture sampling."""
    directory = Path(directory)
    names = sorted(set(groups))
    ids = {name: i for i, name in enumerate(names)}
    buffer = io.BytesIO()
    np.save(buffer, np.asarray([ids[g] for g in groups], dtype=np.uint16))
    _write_if_changed(directory / GROUPS_FILE, buffer.getvalue())
    _write_if_changed(directory / GROUP_NAMES_FILE, json.dumps(names).encode())


class TokenView:
    """All shards as one read-only token sequence: `view[a:b]` is a numpy array."""

    def __init__(self, shards: "TokenShards"):
        self._shards = shards
        self.dtype = shards.dtype

    def __len__(self) -> int:
        return len(self._shards)

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key: int | slice) -> Any:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._shards.read(start, max(start, stop))
            return np.asarray([self[i] for i in range(start, stop, step)], dtype=self.dtype)
        index = int(key) + (n if key < 0 else 0)
        if not 0 <= index < n:
            raise IndexError(f"token index {key} out of range for {n} tokens")
        return self._shards.read(index, index + 1)[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        data = self._shards.read(0, len(self))
        return data.astype(dtype) if dtype is not None else data


class TokenShards:
    """A shard folder written by `write_shards`, memory-mapped."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = read_index(self.directory)
        if index is None or index.get("format") != FORMAT:
            raise UserError(f"{self.directory}: no token shards here ({INDEX_FILE} missing); run the tokenize stage")
        if not is_complete(self.directory):
            raise UserError(
                f"{self.directory}: token shards are incomplete (tokenize was interrupted); re-run tokenize"
            )
        self.index = index
        self.dtype = np.dtype(index["dtype"])
        self.vocab_size: int = index["vocab_size"]
        self.shards = [
            np.memmap(self.directory / e["file"], dtype=self.dtype, mode="r", shape=(e["tokens"],))
            for e in index["shards"]
        ]
        self._starts = np.cumsum([0] + [len(s) for s in self.shards])
        self._samplers: dict = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def tokens(self) -> TokenView:
        return TokenView(self)

    @property
    def num_documents(self) -> int:
        return int(self.index["documents"])

    @property
    def doc_offsets(self) -> np.ndarray:
        """Start of every document in the token stream, then the total: document i is
        tokens[offsets[i]:offsets[i + 1]] (ending in its end-of-text id)."""
        return np.load(self.directory / self.index["doc_offsets"], mmap_mode="r")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole stream, across shard boundaries."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"tokens [{start}, {stop}) out of range for {len(self)} tokens")
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        shard = first
        while start < stop:
            offset = start - int(self._starts[shard])
            take = min(stop - start, len(self.shards[shard]) - offset)
            pieces.append(self.shards[shard][offset : offset + take])
            start += take
            shard += 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)

    def _check_window(self, seq_len: int) -> None:
        if len(self) < seq_len + 1:
            raise UserError(
                f"{self.directory}: {len(self)} tokens, fewer than one window of seq_len {seq_len} + 1; "
                "lower seq_len or add data"
            )

    @property
    def group_names(self) -> list[str]:
        path = self.directory / GROUP_NAMES_FILE
        return json.loads(path.read_text()) if path.is_file() else ["general"]

    def mixture_sampler(self, mixture: dict[str, float] | None, min_doc_tokens: int = 0):
        """(group probabilities, per group: cumulative lengths and starts of its eligible
        documents); without a mixture every group weighs its eligible tokens. Raises a
        UserError for a group the data lacks, so a schedule can be checked up front."""
        key = (tuple(sorted((mixture or {}).items())), min_doc_tokens)
        if key in self._samplers:
            return self._samplers[key]
        names = self.group_names
        unknown = sorted(set(mixture or {}) - set(names))
        if unknown:
            raise UserError(
                f"mixture group '{unknown[0]}' has no documents; the data has groups: {', '.join(names)} "
                "(set `group` on the data-fetch sources)"
            )
        path = self.directory / GROUPS_FILE
        offsets = np.asarray(self.doc_offsets)
        lengths = np.diff(offsets)
        groups = np.load(path) if path.is_file() else np.zeros(len(lengths), dtype=np.uint16)
        probs, tables = [], []
        for name in mixture or names:
            eligible = (groups == names.index(name)) & (lengths >= max(1, min_doc_tokens))
            weight = mixture[name] if mixture else float(lengths[eligible].sum())
            if weight == 0:
                continue
            if not eligible.any():
                raise UserError(f"mixture group '{name}' has no document of at least {min_doc_tokens} tokens")
            probs.append(weight)
            tables.append((np.cumsum(lengths[eligible]), offsets[:-1][eligible]))
        if not probs:
            raise UserError(f"no document of at least {min_doc_tokens} tokens in the training data")
        sampler = (np.asarray(probs) / sum(probs), tables)
        self._samplers[key] = sampler
        return sampler

    def _mixture_starts(self, rng, batch_size: int, seq_len: int, mixture, min_doc_tokens: int) -> np.ndarray:
        """Window starts: a group drawn by its weight, then a token of its eligible documents
        drawn uniformly (so longer documents give more windows)."""
        probs, tables = self.mixture_sampler(mixture, min_doc_tokens)
        starts = np.empty(batch_size, dtype=np.int64)
        for row, g in enumerate(rng.choice(len(tables), size=batch_size, p=probs)):
            cumulative, doc_starts = tables[g]
            position = int(rng.integers(0, cumulative[-1]))
            doc = int(np.searchsorted(cumulative, position, side="right"))
            offset = position - (int(cumulative[doc - 1]) if doc else 0)
            starts[row] = min(int(doc_starts[doc]) + offset, len(self) - seq_len - 1)
        return starts

    def batch(
        self,
        step: int,
        batch_size: int,
        seq_len: int,
        seed: int,
        mixture: dict[str, float] | None = None,
        min_doc_tokens: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (inputs, targets) pair of `step`: [batch_size, seq_len] int64 windows at random
        offsets drawn from a generator seeded by (seed, step) alone: uniform over the stream,
        or, given a `mixture` ({group: weight}) or `min_doc_tokens`, from the documents of
        each group (of at least that many tokens) in proportion to the weights."""
        self._check_window(seq_len)
        rng = np.random.default_rng([seed % (1 << 64), step])
        if mixture or min_doc_tokens:
            starts = self._mixture_starts(rng, batch_size, seq_len, mixture, min_doc_tokens)
        else:
            starts = rng.integers(0, len(self) - seq_len, size=batch_size)
        windows = torch.from_numpy(np.stack([self.read(int(s), int(s) + seq_len + 1) for s in starts]).astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def batches(
        self, batch_size: int, seq_len: int, seed: int, start_step: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless training batches from `start_step` on (see `batch`)."""
        self._check_window(seq_len)

        def stream() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            step = start_step
            while True:
                yield self.batch(step, batch_size, seq_len, seed)
                step += 1

        return stream()

    def sequential_windows(
        self, seq_len: int, batch_size: int = 1, max_windows: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows in stream order, for evaluation: (inputs, targets) of
        shape [<= batch_size, seq_len]; window i predicts tokens i*seq_len+1 .. (i+1)*seq_len."""
        self._check_window(seq_len)
        count = (len(self) - 1) // seq_len
        if max_windows is not None:
            count = min(count, max_windows)
        for first in range(0, count, batch_size):
            rows = [
                self.read(i * seq_len, i * seq_len + seq_len + 1) for i in range(first, min(count, first + batch_size))
            ]
            windows = torch.from_numpy(np.stack(rows).astype(np.int64))
            yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
