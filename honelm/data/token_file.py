"""Token files on disk: where they are cached, how a corpus is tokenised into one, and blocks served from one.

A corpus larger than memory is tokenised once, in worker processes, into a flat file of token ids
(uint16 when the vocabulary has at most 65,535 ids, else uint32), documents one after another
with no separator; their lengths sit beside it. `write_split_stream` then lays one split out as
the EOS-separated stream `honelm.data.packing` builds in memory (EOS d1 EOS d2 ... dn EOS, in the
split's document order), and `MemmapBlocks` serves the blocks of that stream from a numpy
memmap: the same blocks of T tokens, overlapping by one, the last one padded, that `PackedBlocks`
holds in memory, with the same `collate`; resident memory does not grow with the corpus.

The cache root (`honelm.config.cache_root`) is `data.cache_dir`, else $HONELM_CACHE_DIR, else $XDG_CACHE_HOME/honelm, else
~/.cache/honelm; the corpus entries live under its `corpus/` folder (delete it to clear them).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

import numpy as np
import torch

from honelm.data.packing import IGNORE
from honelm.tracking import phase

CACHE_FORMAT = 1
"""Bumped whenever what is written changes, so an old cache entry is never read as a new one."""
_CHUNK_CHARS = 1 << 20  # texts per worker task: about a megabyte of characters
_WORKER: dict[str, Any] = {}  # the tokenizer of a worker process (set by its initializer)


def token_dtype(vocab: int) -> np.dtype:
    """uint16 when every id fits (vocabulary <= 65,535), else uint32."""
    return np.dtype(np.uint16) if vocab <= 65535 else np.dtype(np.uint32)


def eos_id(tokenizer: Any) -> int:
    """The id that separates documents (EOS, else SEP), as `honelm.data.packing.token_stream` uses."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ValueError("the tokenizer has neither an EOS nor a SEP token to separate documents")
    return int(eos)


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of everything that decides the ids: the fast tokenizer's full JSON (else its vocabulary), its
    class and its special-token ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    h.update(body.encode("utf-8"))
    h.update(json.dumps([tokenizer.eos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, len(tokenizer)])
             .encode())
    return h.hexdigest()


def default_workers(configured: int) -> int:
    """`data.tokenize_workers`, or for 0 one per CPU core (at most 8)."""
    return configured if configured > 0 else max(1, min(os.cpu_count() or 1, 8))


def progress(total: int, what: str) -> ContextManager[Callable[[int], None]]:
    """The terminal's progress display for `what` (honelm.tracking.phase: one display, also when this runs inside
    another phase); advance it with the yielded function."""
    return phase(None, what, total)


# --------------------------------------------------------------------------------------------
# Tokenising a corpus into one flat file


def _init_worker(tokenizer: Any) -> None:
    _WORKER["tokenizer"] = tokenizer


def _encode(job: tuple[list[str], str]) -> tuple[bytes, np.ndarray]:
    """One chunk of texts → (their ids back to back as bytes of `dtype`, each text's length)."""
    texts, dtype = job
    ids = _WORKER["tokenizer"](texts, add_special_tokens=False)["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for x in ids for t in x), dtype=dtype, count=int(lengths.sum()))
    return flat.tobytes(), lengths


def _chunks(texts: Iterable[str], dtype: str, advance: Callable[[int], None]) -> Iterator[tuple[list[str], str]]:
    chunk: list[str] = []
    size = 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        advance(len(text.encode("utf-8")) + 1)
        if size >= _CHUNK_CHARS:
            yield chunk, dtype
            chunk, size = [], 0
    if chunk:
        yield chunk, dtype


def tokenize_to_file(tokenizer: Any, texts: Iterable[str], path: Path, total_bytes: int, workers: int
                     ) -> np.ndarray:
    """Write the ids of `texts` (no special tokens) back to back into `path`; return each text's length.

    `workers` > 1 tokenises in that many forked processes (chunks of about a megabyte of text, written
    in order); 1 tokenises in this process.
    """
    dtype = token_dtype(len(tokenizer)).str
    lengths: list[np.ndarray] = []
    with open(path, "wb") as out, progress(total_bytes, "tokenising (bytes)") as advance:
        jobs = _chunks(texts, dtype, advance)
        if workers <= 1:
            _init_worker(tokenizer)
            results: Iterable[tuple[bytes, np.ndarray]] = map(_encode, jobs)
            for flat, n in results:
                out.write(flat)
                lengths.append(n)
        else:
            # fork: the workers inherit the tokenizer instead of unpickling it; the Rust thread pool
            # of each stays off (their parallelism is the processes)
            before = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                with multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer,)) as pool:
                    for flat, n in pool.imap(_encode, jobs):
                        out.write(flat)
                        lengths.append(n)
            finally:
                if before is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = before
    return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)


def write_split_stream(tokens: Path, offsets: np.ndarray, lengths: np.ndarray, order: np.ndarray, eos: int,
                       dtype: np.dtype, out_path: Path) -> int:
    """EOS d_order[0] EOS d_order[1] ... EOS into `out_path` from the flat token file; returns its length.

    Reads each document with one positioned read (no mapping of the whole file: resident memory
    stays flat), writes sequentially.
    """
    item = dtype.itemsize
    sep = np.array([eos], dtype=dtype).tobytes()
    written = 1
    with open(tokens, "rb") as src, open(out_path, "wb") as out:
        fd = src.fileno()
        out.write(sep)
        buffer: list[bytes] = []
        for i in order.tolist():
            buffer.append(os.pread(fd, int(lengths[i]) * item, int(offsets[i]) * item))
            buffer.append(sep)
            written += int(lengths[i]) + 1
            if len(buffer) >= 8192:
                out.write(b"".join(buffer))
                buffer = []
        out.write(b"".join(buffer))
    return written


# --------------------------------------------------------------------------------------------
# Blocks served from a token stream on disk


@dataclass
class MemmapBlocks:
    """The packed blocks of one split's token stream on disk: `PackedBlocks`' length, collate and n_bytes.

    Block i is stream[i*(T-1) : i*(T-1)+T]; past the end of the stream it is padded (labels -100,
    attention 0). The memmap opens lazily in each process, so the object pickles cheaply.
    """

    path: Path
    length: int  # tokens in the stream
    dtype: str
    block_size: int
    pad_id: int
    n_bytes: int
    n_documents: int
    _tokens: np.ndarray | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}

    def __len__(self) -> int:
        return max(1, math.ceil((self.length - 1) / (self.block_size - 1)))

    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", shape=(self.length,))
        return self._tokens

    def collate(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        t, stride, stream = self.block_size, self.block_size - 1, self.tokens()
        ids = np.full((len(idx), t), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), t), dtype=np.int64)
        for row, i in enumerate(idx):
            start = int(i) * stride
            piece = stream[start:min(start + t, self.length)]
            ids[row, :len(piece)] = piece
            mask[row, :len(piece)] = 1
        input_ids, attention = torch.from_numpy(ids), torch.from_numpy(mask)
        return {"input_ids": input_ids, "labels": input_ids.masked_fill(attention == 0, IGNORE),
                "attention_mask": attention}


def timed(say: Callable[[str], None], what: str) -> Callable[[str], None]:
    """`done(detail)`: says "{what}: {detail} (N.N s)" with the time since this call."""
    start = time.perf_counter()

    def done(detail: str) -> None:
        say(f"{what}: {detail} ({time.perf_counter() - start:.1f} s)")
    return done
