"""Corpora larger than memory: the split of a text corpus computed while streaming it, and its token streams
on disk (`data.memmap`; docs/corpus.md).

`corpus_splits` chooses: below `data.memmap_threshold_mb` (with `data.memmap=auto`) the corpus is
read into memory and split by `honelm.data.sources.text_splits`, as always; above it, or with
`data.memmap=on`, this module does the same work without holding the text:

1. scan: the files are hashed (sha256 of their bytes, streamed) and read document by document,
   keeping per document only its content hash, UTF-8 size, file and line (52 bytes), plus
   the texts of a bounded sample (the `data.near_dup_sample` documents with the smallest content
   hashes: a uniform sample fixed by content). Cached by the files' hash and the reading settings.
2. split: exactly `make_splits`' assignment (groups of exact duplicates ordered by
   sha256(seed, content hash), cut by largest-remainder counts, members by file and line), so a
   corpus that fits gives the same train/val/test documents in the same order, and the same
   manifest hashes. Exact duplicates are found by hash over every document; near duplicates
   (MinHash + LSH, `honelm.data.splits`) over the sample, which the log and the manifest name.
   Per-document hash lists are left out of the manifest (they would be as large as a corpus index).
3. tokens: once the tokenizer is known, `CorpusPart.blocks` tokenises every document in worker
   processes into a flat token file and lays each split out as its EOS-separated stream
   (`honelm.data.token_file`), cached by (files, reading settings, tokenizer, split settings) and
   reused by later runs; training reads blocks from the memmap (`MemmapBlocks`), the same blocks
   `pack` would build in memory.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from honelm.config import cache_root
from honelm.data import hub
from honelm.data.readers import BadRows, Document, expand_paths, iter_documents, read_documents
from honelm.data.sources import (check_not_empty, read_test_later, say_split, skipping,
                                 text_splits)
from honelm.data.splits import (SPLIT_NAMES, Splits, _allocate, _file_sha256, _near_duplicates, _ratio_weights,
                                _Universe, parse_ratios)
from honelm.data.token_file import (CACHE_FORMAT, MemmapBlocks, default_workers, eos_id, progress, timed,
                                    token_dtype, tokenize_to_file, tokenizer_hash, write_split_stream)
from honelm.errors import ConfigError


def _settings_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([CACHE_FORMAT, *parts], default=str).encode()).hexdigest()[:24]


def wants_memmap(data: Any, say: Callable[[str], None], blocked: str = "") -> bool:
    """Whether `data` is read through the memory-mapped path: data.memmap=on, or auto and the data.train files
    reach data.memmap_threshold_mb. What the streamed path cannot read (`blocked`, the caller's reason; a dataset
    by name, hf:; a validation file) keeps the in-memory path: refused under `on`, said under `auto` when the
    corpus is large enough that it would have streamed."""
    mode = data.memmap
    if mode == "off":
        return False
    hub_named = any(hub.is_hub(s) for s in data.train.split(","))
    blocked = blocked or ("a dataset by name (hf:)" if hub_named else "a validation file (data.val)" if data.val
                          else "")
    if blocked and mode == "on":
        raise ConfigError(f"data.memmap=on streams data.train from files and splits it by ratio, which it cannot do "
                          f"with {blocked}; use data.memmap=off (or auto)")
    if mode == "on":
        return True
    size = 0 if hub_named else sum(p.stat().st_size for p in expand_paths(data.train.split(",")))
    large = size >= data.memmap_threshold_mb * 1e6
    if blocked and large:
        say(f"note: data.train is {size / 1e6:,.0f} MB, above data.memmap_threshold_mb, but is read into memory: "
            f"the streamed path cannot take {blocked}")
    return large and not blocked


def corpus_splits(data: Any, say: Callable[[str], None], leak_texts: list[str] | None = None,
                  blocked: str = "") -> Splits:
    """The documents of `data` split by data.split: in memory (`text_splits`) or streamed (this module); `blocked`:
    why this caller's data cannot be streamed (`wants_memmap`)."""
    if not data.train:
        raise ConfigError("data.train is empty: give a text file, directory or glob")
    if not wants_memmap(data, say, blocked):
        return text_splits(data, say, leak_texts)
    return LargeCorpus.open(data, say).splits(data, say, leak_texts)


# --------------------------------------------------------------------------------------------
# 1. scan


@dataclass
class Scan:
    """What is kept of every document of a corpus (arrays in file order) and the sample's texts."""

    hashes: np.ndarray  # (N, 32) uint8: sha256 of each text
    nbytes: np.ndarray  # (N,) int64: UTF-8 bytes of each text
    lines: np.ndarray  # (N,) int64
    sources: np.ndarray  # (N,) int32, index into `names`
    names: list[str]
    sample: dict[int, str]  # document index → text
    skipped: dict[str, Any] | None = None  # data.skip_bad_rows' record

    def save(self, folder: Path) -> None:
        np.savez(folder / "scan.npz", hashes=self.hashes, nbytes=self.nbytes, lines=self.lines, sources=self.sources)
        meta = {"names": self.names, "skipped": self.skipped, "sample": [[i, t] for i, t in self.sample.items()]}
        (folder / "scan.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> Scan:
        arrays = np.load(folder / "scan.npz")
        meta = json.loads((folder / "scan.json").read_text(encoding="utf-8"))
        return cls(arrays["hashes"], arrays["nbytes"], arrays["lines"], arrays["sources"], meta["names"],
                   {int(i): t for i, t in meta["sample"]}, meta["skipped"])


def _scan(documents: Iterator[Document], sample_size: int, total: int) -> Scan:
    """One pass over the documents: content hashes, sizes, places, and the bottom-k sample by content hash."""
    hashes, nbytes, lines, sources = bytearray(), array("q"), array("q"), array("i")  # compact: ~52 bytes each
    names: dict[str, int] = {}
    heap: list[tuple[int, int, str]] = []  # the sample: a max-heap by (hash prefix, index), through negation
    with progress(total, "reading (bytes)") as advance:
        for i, doc in enumerate(documents):
            raw = doc.text.encode("utf-8")
            digest = hashlib.sha256(raw).digest()
            hashes += digest
            nbytes.append(len(raw))
            lines.append(doc.line)
            sources.append(names.setdefault(doc.source, len(names)))
            advance(len(raw) + 1)
            entry = (-int.from_bytes(digest[:8], "big"), -i, doc.text)
            if len(heap) < sample_size:
                heapq.heappush(heap, entry)
            elif entry > heap[0]:
                heapq.heapreplace(heap, entry)
    return Scan(np.frombuffer(bytes(hashes), dtype=np.uint8).reshape(-1, 32), np.array(nbytes, dtype=np.int64),
                np.array(lines, dtype=np.int64), np.array(sources, dtype=np.int32).reshape(-1), list(names),
                {-i: text for _, i, text in heap})


# --------------------------------------------------------------------------------------------
# 2. split


def _hex(row: np.ndarray) -> str:
    return row.tobytes().hex()


def split_keys(hashes: np.ndarray, seed: int) -> np.ndarray:
    """(N, 2) uint64: the first 16 bytes of sha256(f"{seed}\\x1f{content hash}"), make_splits' order key."""
    prefix, raw = f"{seed}\x1f".encode(), hashes.tobytes()
    out = bytearray()
    for at in range(0, len(raw), 32):
        out += hashlib.sha256(prefix + raw[at:at + 32].hex().encode()).digest()[:16]
    return np.frombuffer(bytes(out), dtype=">u8").reshape(-1, 2).astype(np.uint64)


def assign(scan: Scan, seed: int, active: list[str], weights: list[float]) -> dict[str, np.ndarray]:
    """Each split's document indices in make_splits' order (ratio mode, one stratum).

    Groups of equal content share a key; they are cut in key order, a group going to the current
    split while that split holds fewer rows than its count (so a group may overfill it, as there).
    """
    n = len(scan.hashes)
    keys = split_keys(scan.hashes, seed)
    rank = np.argsort(np.argsort(np.array(scan.names, dtype=object), kind="stable"), kind="stable")
    order = np.lexsort((scan.lines, rank[scan.sources], keys[:, 1], keys[:, 0]))
    sorted_keys = keys[order]
    new = np.ones(n, dtype=bool)
    new[1:] = np.any(sorted_keys[1:] != sorted_keys[:-1], axis=1)
    starts = np.flatnonzero(new)  # position of each group's first member in `order`
    counts = _allocate([n], weights)[0]
    group_split = np.empty(len(starts), dtype=np.int64)
    first, before = 0, 0
    for j in range(len(active)):
        end = len(starts) if j == len(active) - 1 else max(first, int(np.searchsorted(starts, before + counts[j])))
        group_split[first:end] = j
        first = end
        before = int(starts[end]) if end < len(starts) else n
    doc_split = np.repeat(group_split, np.diff(np.append(starts, n)))
    return {name: order[doc_split == j] for j, name in enumerate(active)}


def split_hash(hashes: np.ndarray) -> str:
    """`honelm.data.splits._split_hash` of these content hashes: sha256 of their sorted hex, one per line."""
    ordered = np.sort(np.ascontiguousarray(hashes).view("V32").ravel()).tobytes()  # bytes order = hex order
    h = hashlib.sha256()
    step = 32 * 65536
    for at in range(0, len(ordered), step):
        piece = ordered[at:at + step]
        text = "\n".join(piece[k:k + 32].hex() for k in range(0, len(piece), 32))
        h.update((("\n" if at else "") + text).encode())
    return h.hexdigest()


def _within(scan: Scan, order: np.ndarray) -> int:
    """Rows of a split that repeat an earlier row of the same split (exact duplicates within it)."""
    return int(len(order) - len(np.unique(scan.hashes[order].view("V32").ravel())))


def _sample_universe(scan: Scan, orders: dict[str, np.ndarray]) -> _Universe:
    """The sampled documents in make_splits' universe order (train, val, test; each in split order)."""
    uni = _Universe([], [], [], [], [], [])
    for s, name in enumerate(SPLIT_NAMES):
        order = orders.get(name)
        if order is None:
            continue
        for position in np.flatnonzero(np.isin(order, np.fromiter(scan.sample, dtype=np.int64))).tolist():
            i = int(order[position])
            uni.split.append(s)
            uni.index.append(position)
            uni.source.append(scan.names[scan.sources[i]])
            uni.line.append(int(scan.lines[i]))
            uni.hashes.append(_hex(scan.hashes[i]))
            uni.texts.append(scan.sample[i])
    return uni


def duplicates(scan: Scan, orders: dict[str, np.ndarray], threshold: float, leak_checked: bool, sample_size: int
               ) -> tuple[dict[str, Any], set[int]]:
    """The manifest's `duplicates` record, and the train documents (indices into the scan) involved.

    Ratio splits keep exact duplicates together, so none cross; near duplicates are searched in the
    sample (complete when it holds every document).
    """
    uni = _sample_universe(scan, orders)
    count, pairs, train_hit, complete, by_pair = _near_duplicates(uni, threshold)
    within = {name: _within(scan, orders[name]) if name in orders else 0 for name in SPLIT_NAMES}
    n = len(scan.hashes)
    record = {
        "exact": {"count": 0, "by_split_pair": {}, "pairs": [], "within_split": within},
        "near": {"count": count, "by_split_pair": by_pair, "threshold": threshold, "pairs": pairs,
                 "complete": complete, "sample": {"documents": len(uni.texts), "of": n,
                                                  "whole_corpus": len(uni.texts) >= n,
                                                  "data.near_dup_sample": sample_size}},
        "test_leak_checked": leak_checked,
    }
    train = orders["train"]
    return record, {int(train[uni.index[i]]) for i in train_hit}


# --------------------------------------------------------------------------------------------
# The corpus, its parts, and their token streams


@dataclass
class CorpusPart:
    """One split of a large corpus: its documents (indices into the scan, in split order), never their text.

    `blocks` gives its packed blocks from the token cache; iterating reads its documents from the
    files again (in file order), for a tokenizer trained on the fly.
    """

    corpus: LargeCorpus
    name: str
    order: np.ndarray

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[Document]:
        wanted = np.zeros(len(self.corpus.scan.hashes), dtype=bool)
        wanted[self.order] = True
        for i, doc in enumerate(self.corpus.documents()):
            if wanted[i]:
                yield doc

    def texts(self) -> Iterator[str]:
        return (d.text for d in self)

    def blocks(self, tokenizer: Any, block_size: int) -> MemmapBlocks:
        return self.corpus.streams(tokenizer)(self.name, block_size)

    @property
    def n_bytes(self) -> int:
        return int(self.corpus.scan.nbytes[self.order].sum()) + len(self.order)


@dataclass
class LargeCorpus:
    """A corpus read through the scan cache; splits and token streams made from it on request."""

    spec: list[str]
    unit: str
    text_field: str
    folder: Path  # this corpus's cache entry: root/corpus/<files and reading settings>
    workers: int
    scan: Scan
    say: Callable[[str], None]
    orders: dict[str, np.ndarray] = field(default_factory=dict)
    split_key: str = ""
    _streams: dict[str, Any] = field(default_factory=dict)

    def documents(self) -> Iterator[Document]:
        return iter_documents(self.spec, self.unit, self.text_field, BadRows(skip=True))

    @classmethod
    def open(cls, data: Any, say: Callable[[str], None]) -> LargeCorpus:
        """Hash the files, then reuse their scan from the cache or scan them now (and cache it)."""
        spec = data.train.split(",")
        files = expand_paths(spec)
        total = sum(p.stat().st_size for p in files)
        done = timed(say, "corpus (data.memmap)")
        digest = _file_sha256(spec)
        key = _settings_key(digest, [p.name for p in files], data.unit, data.text_field, data.skip_bad_rows,
                            data.near_dup_sample)
        folder = cache_root(data.cache_dir) / "corpus" / key
        if (folder / "scan.json").is_file():
            scan = Scan.load(folder)
            done(f"{total / 1e6:.1f} MB in {len(files)} file(s), sha256 {digest[:12]}: scan of {len(scan.hashes)} "
                 f"documents reused from {folder}")
        else:
            bad = skipping(data)
            scan = _scan(iter_documents(spec, data.unit, data.text_field, bad), data.near_dup_sample, total)
            bad.check()
            scan.skipped = bad.record() if bad.errors else None
            _publish(folder, scan.save)
            done(f"{total / 1e6:.1f} MB in {len(files)} file(s), sha256 {digest[:12]}: {len(scan.hashes)} documents "
                 f"scanned, cached in {folder}")
        if not len(scan.hashes):
            read_documents(spec, data.unit, data.text_field)  # raises the reader's own "no documents" error
        return cls(spec, data.unit, data.text_field, folder, default_workers(data.tokenize_workers), scan, say)

    def splits(self, data: Any, say: Callable[[str], None], leak_texts: list[str] | None) -> Splits:
        """make_splits' split of the scanned documents (module docstring), as a `Splits` of `CorpusPart`s."""
        done = timed(say, "split (data.memmap)")
        r = parse_ratios(data.split)
        load_test = read_test_later(lambda b: read_documents(data.test.split(","), unit=data.unit,
                                                             text_field=data.text_field, bad=b), data, say) \
            if data.test else None
        active, weights = _ratio_weights(r, {"val": False, "test": load_test is not None})
        self.orders = assign(self.scan, data.seed, active, weights)
        leak_checked = load_test is None
        record, drop = duplicates(self.scan, self.orders, data.near_dup_threshold, leak_checked, data.near_dup_sample)
        removed = []
        if data.dedup and drop:
            train = self.orders["train"]
            removed = [{"source": self.scan.names[self.scan.sources[i]], "line": int(self.scan.lines[i])}
                       for i in train.tolist() if i in drop]
            self.orders["train"] = train[~np.isin(train, np.fromiter(drop, dtype=np.int64))]
        manifest = self._manifest(data, r, active, record, removed, load_test)
        self.split_key = _settings_key(manifest["hashes"], data.seed, list(r), active, data.dedup,
                                       data.near_dup_threshold)
        sample = record["near"]["sample"]
        done(f"{len(self.scan.hashes)} documents by content hash; near duplicates searched in "
             + ("every document" if sample["whole_corpus"] else
                f"a sample of {sample['documents']} of {sample['of']} documents (data.near_dup_sample)"))
        parts = {name: CorpusPart(self, name, self.orders.get(name, np.zeros(0, dtype=np.int64)))
                 for name in SPLIT_NAMES}
        splits = Splits(train=parts["train"], val=parts["val"], manifest=manifest,  # type: ignore[arg-type]
                        _test_examples=None if load_test else parts["test"], _load_test=load_test)  # type: ignore
        if self.scan.skipped:
            manifest["skipped_rows"] = self.scan.skipped
            say(f"data.skip_bad_rows: left out {self.scan.skipped['count']} bad row(s) (the first few in "
                "split_manifest.json's skipped_rows)")
        say_split(manifest, say)
        check_not_empty(manifest, data)
        return splits

    def _manifest(self, data: Any, r: tuple[float, float, float], active: list[str], record: dict[str, Any],
                  removed: list[dict[str, Any]], load_test: Any) -> dict[str, Any]:
        hashes: dict[str, str | None] = {name: split_hash(self.scan.hashes[self.orders.get(name, [])])
                                         for name in ("train", "val")}
        counts = {name: len(self.orders.get(name, [])) for name in ("train", "val")}
        test_sha = None
        if load_test is None:
            hashes["test"] = split_hash(self.scan.hashes[self.orders.get("test", [])])
            counts["test"] = len(self.orders.get("test", []))
        else:
            test_sha = _file_sha256(data.test.split(","))
            hashes["test"], counts["test"] = test_sha, None
        manifest: dict[str, Any] = {
            "seed": data.seed, "ratios": list(r), "ratio_splits": active, "stratified": False, "counts": counts,
            "label_histogram": {name: {} for name in counts if counts[name] is not None}, "hashes": hashes,
            "example_hashes": None,  # one hash per document: as large as an index of the corpus, so not listed
            "duplicates": record,
            "dedup": {"enabled": data.dedup, "removed_from_train": len(removed), "removed": removed[:50]},
            "test_source": ",".join(data.test.split(",")) if load_test is not None else "ratio",
            "memmap": {"documents": len(self.scan.hashes), "cache": str(self.folder)},
        }
        if load_test is not None:
            manifest["test_file_sha256"] = test_sha
        return manifest

    def streams(self, tokenizer: Any) -> Callable[[str, int], MemmapBlocks]:
        """`blocks(split, block_size)` over this split's token streams, tokenising the corpus first if no cache
        entry for (this corpus, tokenizer, split) exists."""
        tok_key = tokenizer_hash(tokenizer)[:24]
        if tok_key not in self._streams:
            self._streams[tok_key] = self._build_streams(tokenizer, self.folder / f"tokens-{tok_key}")
        info = self._streams[tok_key]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        def blocks(name: str, block_size: int) -> MemmapBlocks:
            part = info["splits"][name]
            return MemmapBlocks(info["folder"] / f"{name}.bin", part["tokens"], info["dtype"], block_size, pad,
                                part["n_bytes"], part["documents"])
        return blocks

    def _build_streams(self, tokenizer: Any, folder: Path) -> dict[str, Any]:
        if not (folder / "lengths.npy").is_file():
            done = timed(self.say, "tokenising (data.memmap)")
            total = int(self.scan.nbytes.sum()) + len(self.scan.nbytes)

            def write(tmp: Path) -> None:
                lengths = tokenize_to_file(tokenizer, (d.text for d in self.documents()), tmp / "tokens.bin", total,
                                           self.workers)
                np.save(tmp / "lengths.npy", lengths)
            _publish(folder, write)
            lengths = np.load(folder / "lengths.npy")
            done(f"{len(lengths)} documents → {int(lengths.sum())} tokens with {self.workers} worker process(es), "
                 f"cached in {folder}")
        else:
            self.say(f"tokenising (data.memmap): token file reused from {folder}")
        streams = folder / f"split-{self.split_key}"
        if not (streams / "streams.json").is_file():
            _publish(streams, lambda tmp: self._write_streams(tokenizer, folder, tmp))
        else:
            self.say(f"token streams (data.memmap): reused from {streams}")
        meta = json.loads((streams / "streams.json").read_text(encoding="utf-8"))
        return {**meta, "folder": streams}

    def _write_streams(self, tokenizer: Any, folder: Path, tmp: Path) -> None:
        done = timed(self.say, "token streams (data.memmap)")
        lengths = np.load(folder / "lengths.npy")
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        dtype = token_dtype(len(tokenizer))
        meta: dict[str, Any] = {"dtype": dtype.str, "splits": {}}
        for name in SPLIT_NAMES:
            order = self.orders.get(name, np.zeros(0, dtype=np.int64))
            n = write_split_stream(folder / "tokens.bin", offsets, lengths, order, eos_id(tokenizer), dtype,
                                   tmp / f"{name}.bin")
            meta["splits"][name] = {"tokens": n, "documents": len(order),
                                    "n_bytes": int(self.scan.nbytes[order].sum()) + len(order)}
        (tmp / "streams.json").write_text(json.dumps(meta), encoding="utf-8")
        done(", ".join(f"{k} {v['tokens']} tokens" for k, v in meta["splits"].items()))


def _publish(folder: Path, write: Callable[[Path], None]) -> None:
    """Write a cache entry into a private temporary folder, then rename it into place (a crash never leaves a
    half entry that a later run would trust; of two processes writing the same entry, one rename wins)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        try:
            if not folder.exists():
                os.replace(tmp, folder)
        except OSError:
            if not folder.exists():  # another process's rename won: its entry is the same
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
