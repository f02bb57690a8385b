"""Deterministic, stratified, leak-checked train/val/test splits, and the test-split lock.

This module owns:
- `parse_ratios` and `content_hash` (the identity of a row: its text, never its label);
- `make_splits`, which assigns rows to splits by content and seed only (input order does not
  matter), stratifies by classification label, keeps exact duplicates together, finds exact
  and near duplicates that cross splits (MinHash + LSH, verified by exact Jaccard) and can
  remove them from train;
- the manifest that records all of this, and `verify_manifest` to prove a rebuild matches;
- the lock on the test split: `Splits.test` raises `TestSplitAccessError` except inside
  `unlock_test_split`, and `test_access_count` counts every read, so a test can prove that
  nothing but `honelm test` looks at it.
"""

from __future__ import annotations

import contextvars
import hashlib
import itertools
import math
import os
import re
import threading
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from honelm.data import hub
from honelm.data.readers import Document, Example, check_labels_seen, expand_paths
from honelm.errors import ConfigError, DataError, HonelmError, TestSplitAccessError

__all__ = [
    "Splits",
    "content_hash",
    "content_text",
    "make_splits",
    "parse_ratios",
    "reuse_manifest",
    "test_access_count",
    "forbid_test_split",
    "unlock_test_split",
    "verify_manifest",
]

Item = Union[Example, Document]
SPLIT_NAMES = ("train", "val", "test")
_MAX_LISTED_PAIRS = 50


# --------------------------------------------------------------------------------------------
# Ratios and identity


def parse_ratios(spec: str | Sequence[float]) -> tuple[float, float, float]:
    """Parse "8:1:1", "6:2:2", "0.8,0.1,0.1" or [8, 1, 1] into train/val/test fractions.

    The result sums to 1. Train must be > 0; val and test may be 0 (`make_splits` only allows
    that when that split is supplied by the user).
    """
    if isinstance(spec, str):
        sep = ":" if ":" in spec else ","
        parts = [p.strip() for p in spec.strip().split(sep)]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"ratios {spec!r}: expected three numbers like '8:1:1' or '0.8,0.1,0.1'"
            ) from None
    else:
        try:
            values = [float(v) for v in spec]
        except (TypeError, ValueError):
            raise ValueError(f"ratios {spec!r}: expected three numbers") from None
    if len(values) != 3:
        raise ValueError(f"ratios {spec!r}: expected 3 parts (train:val:test), got {len(values)}")
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"ratios {spec!r}: every part must be a finite number")
    if any(v < 0 for v in values):
        raise ValueError(f"ratios {spec!r}: parts must not be negative")
    total = sum(values)
    if total == 0:
        raise ValueError(f"ratios {spec!r}: all parts are zero")
    if values[0] == 0:
        raise ValueError(f"ratios {spec!r}: the train part must be > 0")
    train, val, test = (v / total for v in values)
    return (train, val, test)


def content_text(ex: Item) -> str:
    """The string that identifies a row: text, plus "\\x1f" + text_pair when there is one.

    Pass these strings as `test_texts_for_leak_check` so a user test file is compared with the
    same identity as everything else.
    """
    pair = getattr(ex, "text_pair", None)
    return ex.text if pair is None else ex.text + "\x1f" + pair


def content_hash(ex: Item) -> str:
    """sha256 hex of `content_text(ex)`; labels are excluded so label noise keeps identity."""
    return _sha256(content_text(ex))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _split_hash(hashes: Sequence[str]) -> str:
    # Sorted, so the identity of a split depends on what is in it, not on its order.
    return _sha256("\n".join(sorted(hashes)))


# --------------------------------------------------------------------------------------------
# The test-split lock

_UNLOCK_REASON: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "honelm_test_split_unlock", default=None
)
_FORBID_REASON: contextvars.ContextVar[str | None] = contextvars.ContextVar("honelm_test_split_forbid", default=None)


class _AccessLog:
    """How many times the test split has been read in this process: an audit record, never a switch.

    `Splits.test` records each successful read; `test_access_count` reports the total, so a test
    can prove that nothing but `honelm test` looked (reads from any thread, any run in the
    process, count alike: hence one record for the process, and a lock).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def record(self) -> None:
        with self._lock:
            self._count += 1

    @property
    def count(self) -> int:
        return self._count


_TEST_READS = _AccessLog()


@contextmanager
def unlock_test_split(reason: str) -> Iterator[None]:
    """Allow `Splits.test` to be read inside this block.

    ONLY `honelm/protocol/test.py` (the `honelm test` verb) calls this; training, model
    selection and evaluation on val must never see the test split. A ContextVar is used so the
    unlock does not leak into other threads or asyncio tasks.
    """
    if not reason or not reason.strip():
        raise ValueError("unlock_test_split needs a reason (it is recorded while unlocked)")
    forbidden = _FORBID_REASON.get()
    if forbidden is not None:
        raise TestSplitAccessError(f"the test split is sealed during {forbidden}: hyperparameters are chosen on "
                                   f"validation only; test the selected run afterwards with `honelm test`")
    token = _UNLOCK_REASON.set(reason)
    try:
        yield
    finally:
        _UNLOCK_REASON.reset(token)


@contextmanager
def forbid_test_split(reason: str) -> Iterator[None]:
    """Seal the test split inside this block: even `unlock_test_split` raises TestSplitAccessError.

    `honelm search` runs every trial inside it, so no code path reachable from a search (a
    stage, a callback, a stray `honelm test` call) can read the test split while choices are
    still being made on validation.
    """
    token = _FORBID_REASON.set(reason)
    try:
        yield
    finally:
        _FORBID_REASON.reset(token)


def test_access_count() -> int:
    """How many times `Splits.test` was read successfully in this process."""
    return _TEST_READS.count


# The name starts with "test", so pytest would collect it when a test module imports it.
test_access_count.__test__ = False  # type: ignore[attr-defined]


@dataclass
class Splits:
    """train/val lists, the manifest, and a locked test split (see `unlock_test_split`)."""

    train: list[Any]
    val: list[Any]
    manifest: dict[str, Any]
    _test_examples: list[Any] | None = field(default=None, repr=False)
    _load_test: Callable[[], list[Any]] | None = field(default=None, repr=False)
    _test_texts_hash: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        counts = self.manifest.get("counts", {})
        return (
            f"Splits(train={len(self.train)}, val={len(self.val)}, test={counts.get('test')}, "
            f"test_source={self.manifest.get('test_source')!r})"
        )

    @property
    def test(self) -> list[Any]:
        """The test rows; raises TestSplitAccessError outside `unlock_test_split`.

        A user-supplied test file is loaded here, on first access, and then checked: its
        labels must all appear in train (DataError otherwise), and its texts must match the
        ones leak-checked when the splits were made.
        """
        if _UNLOCK_REASON.get() is None:
            raise TestSplitAccessError(
                "the test split is locked: only `honelm test` reads it (inside "
                "honelm.data.splits.unlock_test_split); select models on the val split"
            )
        if self._test_examples is None:
            if self._load_test is None:
                raise HonelmError("these splits have no test split")
            loaded = list(self._load_test())
            if not all(isinstance(e, (Example, Document)) for e in loaded):
                raise HonelmError("load_test must return a list of Example or Document")
            if self._test_texts_hash is not None:
                if _split_hash([content_hash(e) for e in loaded]) != self._test_texts_hash:
                    raise HonelmError(
                        f"the test data from {self.manifest.get('test_source')} does not match the "
                        "texts that were leak-checked when the splits were made (file changed?)"
                    )
            if isinstance(self.train, list):  # a large corpus's part holds unlabelled documents: nothing to check
                check_labels_seen(self.train, loaded, "test")
            self._test_examples = loaded
        _TEST_READS.record()
        if not isinstance(self._test_examples, list):
            return self._test_examples  # a large corpus's part (honelm.data.large_corpus): never its texts in memory
        return list(self._test_examples)


# --------------------------------------------------------------------------------------------
# Allocation


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    # Quotas are rounded to 9 decimals so float noise (100.00000000000001) never decides.
    quotas = [round(total * w, 9) for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _allocate(sizes: Sequence[int], weights: Sequence[float]) -> list[list[int]]:
    """Per-stratum counts for each split: largest remainder within every stratum (so each
    count is within 1 of its quota) while also hitting the overall split sizes where
    possible (so many small labels do not all round their remainder into train).

    Ties go to the earlier split (train, then val, then test); every non-empty stratum keeps at
    least one row in train.
    """
    k = len(weights)
    targets = _largest_remainder(sum(sizes), weights)
    quotas = [[round(n * w, 9) for w in weights] for n in sizes]
    alloc = [[math.floor(q) for q in row] for row in quotas]
    row_left = [n - sum(row) for n, row in zip(sizes, alloc)]
    col_left = [targets[i] - sum(row[i] for row in alloc) for i in range(k)]
    cells = sorted(
        (-(quotas[s][i] - alloc[s][i]), i, s)
        for s in range(len(sizes))
        for i in range(k)
        if quotas[s][i] > alloc[s][i]
    )
    bumped: set[tuple[int, int]] = set()
    for _, i, s in cells:
        if row_left[s] > 0 and col_left[i] > 0:
            alloc[s][i] += 1
            row_left[s] -= 1
            col_left[i] -= 1
            bumped.add((s, i))
    # Rows the overall targets could not absorb: give the rest to their largest fractions.
    for _, i, s in cells:
        if row_left[s] > 0 and (s, i) not in bumped:
            alloc[s][i] += 1
            row_left[s] -= 1
            bumped.add((s, i))
    for s, n in enumerate(sizes):
        if n > 0 and alloc[s][0] == 0:
            donor = next(i for i in range(k - 1, 0, -1) if alloc[s][i] > 0)
            alloc[s][donor] -= 1
            alloc[s][0] += 1
    return alloc


def _label_key(label: Any) -> tuple[str, str]:
    # int 1 and str "1" are different classes; sort and compare them by (type, value).
    return (type(label).__name__, str(label))


def _is_class_label(label: Any) -> bool:
    return isinstance(label, (str, int)) and not isinstance(label, bool)


@dataclass
class _Group:
    """Exact duplicates (same content hash), assigned to one split together."""

    hash: str
    key: str
    members: list[Item]
    split: str = "train"

    def labels(self) -> list[Any]:
        return [getattr(m, "label", None) for m in self.members]


def _group_stratum(group: _Group, stratified: bool) -> tuple[str, str]:
    if not stratified:
        return ("", "")
    if len(group.members) == 1:
        return _label_key(getattr(group.members[0], "label", None))
    counts = Counter(_label_key(lbl) for lbl in group.labels())
    # The majority label decides; ties go to the smallest label so the result is order-free.
    best = max(counts.values())
    return min(k for k, c in counts.items() if c == best)


def _assign_by_ratio(
    pool: Sequence[Item], pool_hashes: Sequence[str], active: Sequence[str],
    weights: Sequence[float], seed: int, stratified: bool,
) -> list[_Group]:
    by_hash: dict[str, list[Item]] = defaultdict(list)
    for ex, h in zip(pool, pool_hashes):
        by_hash[h].append(ex)
    groups = [
        _Group(
            h,
            _sha256(f"{seed}\x1f{h}"),
            # Member order must not depend on input order either.
            members if len(members) == 1 else sorted(
                members, key=lambda e: (e.source, e.line, _label_key(getattr(e, "label", None)))
            ),
        )
        for h, members in by_hash.items()
    ]
    strata: dict[tuple[str, str], list[_Group]] = defaultdict(list)
    for g in groups:
        strata[_group_stratum(g, stratified)].append(g)
    keys = sorted(strata)
    sizes = [sum(len(g.members) for g in strata[k]) for k in keys]
    alloc = _allocate(sizes, weights)
    for key, counts in zip(keys, alloc):
        # Order by a hash of (seed, content): a seeded shuffle that ignores input order.
        ordered = sorted(strata[key], key=lambda g: g.key)
        j, filled = 0, [0] * len(active)
        for g in ordered:
            while j < len(active) - 1 and filled[j] >= counts[j]:
                j += 1
            g.split = active[j]
            filled[j] += len(g.members)
    if stratified:
        # A group of duplicates with conflicting labels follows its majority label, so a
        # minority label could land outside train only; pull such groups into train.
        in_train = {_label_key(lbl) for g in groups if g.split == "train" for lbl in g.labels()}
        for g in sorted(groups, key=lambda g: g.key):
            if g.split != "train" and any(_label_key(lbl) not in in_train for lbl in g.labels()):
                g.split = "train"
                in_train.update(_label_key(lbl) for lbl in g.labels())
    return sorted(groups, key=lambda g: g.key)


# --------------------------------------------------------------------------------------------
# Near duplicates: normalise, shingle, MinHash, LSH banding, exact Jaccard

_NON_WORD = re.compile(r"[^\w\s]+")
_NUM_PERM = 64
_U64 = np.uint64
_MASK32 = _U64(0xFFFFFFFF)


def normalize_for_dedup(text: str) -> str:
    """Lowercase, drop punctuation and symbols, collapse whitespace."""
    # "_" counts as a word character for the regex engine, so it is removed separately.
    return " ".join(_NON_WORD.sub("", text.casefold()).replace("_", "").split())


INSIDE_CHECK_LIMIT = 20_000_000
"""Word windows `val_inside_train` forms at most (SST-2: 3.9M windows in 1.4 s on 2 cores); above it the check is
skipped and says so."""


def texts_inside(train_texts: Sequence[str], val_texts: Sequence[str],
                 limit: int = INSIDE_CHECK_LIMIT) -> tuple[list[bool] | None, int]:
    """For each validation text, whether its words (after `normalize_for_dedup`) occur as a contiguous run inside a
    LONGER train text (one equal to a train text is an exact duplicate, counted apart); and the number of word
    windows that takes. Only windows as long as some validation text are formed; when they would exceed `limit`,
    nothing is compared and the flags are None."""
    val_norm = [normalize_for_dedup(t) for t in val_texts]
    wanted = {w for w in val_norm if w}
    lengths = sorted({len(w.split()) for w in wanted})
    train_words = [normalize_for_dedup(t).split() for t in train_texts]
    sizes = np.array([len(w) for w in train_words], dtype=np.int64)
    windows = int(sum(int((sizes[sizes > n] - n + 1).sum()) for n in lengths))
    if windows > limit:
        return None, windows
    found: set[str] = set()
    for words in train_words:
        for n in lengths:
            if n >= len(words):
                break
            for i in range(len(words) - n + 1):
                window = " ".join(words[i:i + n])
                if window in wanted:
                    found.add(window)
    return [w in found for w in val_norm], windows


def val_inside_train(train_texts: Sequence[str], val_texts: Sequence[str],
                     limit: int = INSIDE_CHECK_LIMIT) -> dict[str, Any]:
    """How many validation texts occur word for word inside a longer train text (`texts_inside`), for the split
    manifest and log. Phrase-level data (a treebank's train file holding every sub-phrase of its sentences, as
    SST-2's does) split by row puts phrases of one sentence on both sides; exact and near-duplicate checks miss it,
    as a phrase is neither equal nor similar to the sentence holding it, and validation then overstates accuracy
    on new sentences (on SST-2, 77% of the validation rows, docs/data.md). Over `limit` word windows:
    {"checked": False, ...}."""
    flags, windows = texts_inside(train_texts, val_texts, limit)
    if flags is None:
        return {"checked": False, "windows": windows, "limit": limit, "of": len(val_texts)}
    lengths = sorted(len(normalize_for_dedup(t).split()) for t, inside in zip(val_texts, flags) if inside)
    return {"checked": True, "count": len(lengths), "of": len(val_texts),
            "median_words": lengths[len(lengths) // 2] if lengths else None}


class _WordHashes(dict):  # type: ignore[type-arg]
    """crc32 per word, cached: deterministic across processes, unlike hash()."""

    def __missing__(self, word: str) -> int:
        value = zlib.crc32(word.encode("utf-8"))
        self[word] = value
        return value


def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser: spreads the combined word hashes over all 64 bits.
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _shingles(units: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of all units, concatenated unit by unit, plus each unit's start offset.

    Word 3-grams, except char 5-grams for texts with fewer than 3 words or without spaces
    (CJK): a word shingle there would be the whole text and miss one-character edits.
    """
    words_hash = _WordHashes()
    word_units: list[int] = []
    word_lists: list[list[int]] = []
    char_units: list[int] = []
    for u, text in enumerate(units):
        words = text.split(" ")
        if len(words) >= 3 and len(text) <= 20 * len(words):
            word_units.append(u)
            word_lists.append(list(map(words_hash.__getitem__, words)))
        else:
            char_units.append(u)
    per_unit: list[np.ndarray | None] = [None] * len(units)
    if word_units:
        lens = np.fromiter((len(w) for w in word_lists), dtype=np.int64, count=len(word_lists))
        tok = np.fromiter(itertools.chain.from_iterable(word_lists), dtype=np.uint64, count=int(lens.sum()))
        starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
        pos_in_unit = np.arange(len(tok)) - np.repeat(starts, lens)
        valid = pos_in_unit <= np.repeat(lens, lens) - 3
        padded = np.concatenate((tok, np.zeros(2, dtype=np.uint64)))
        prime = _U64(0x100000001B3)
        combined = (padded[:-2] * prime + padded[1:-1]) * prime + padded[2:]
        grams = _mix64(combined[valid])
        counts = lens - 2
        bounds = np.concatenate(([0], np.cumsum(counts)))
        for idx, u in enumerate(word_units):
            per_unit[u] = grams[bounds[idx] : bounds[idx + 1]]
    for u in char_units:
        text = units[u]
        grams_list = [text] if len(text) <= 5 else [text[i : i + 5] for i in range(len(text) - 4)]
        hashed = np.fromiter((zlib.crc32(g.encode("utf-8")) for g in grams_list), dtype=np.uint64)
        per_unit[u] = _mix64(hashed)
    arrays = [a for a in per_unit if a is not None]
    offsets = np.concatenate(([0], np.cumsum([len(a) for a in arrays])[:-1])).astype(np.int64)
    return np.concatenate(arrays), offsets


def _minhash(shingles: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(units, 64) MinHash signatures with multiply-shift hashes from a fixed seed."""
    rng = np.random.default_rng(20240917)  # fixed: signatures must be identical every run
    a = rng.integers(1, 2**63, size=_NUM_PERM, dtype=np.uint64) * _U64(2) + _U64(1)
    b = rng.integers(0, 2**63, size=_NUM_PERM, dtype=np.uint64)
    x = (shingles >> _U64(32)) ^ (shingles & _MASK32)
    sig = np.empty((len(offsets), _NUM_PERM), dtype=np.uint64)
    for k in range(_NUM_PERM):
        sig[:, k] = np.minimum.reduceat((x * a[k] + b[k]) >> _U64(32), offsets)
    return sig


def _rows_per_band(threshold: float) -> int:
    # Fewest candidates (most rows per band) that still catch a pair at the threshold with
    # probability >= 0.995.
    best = 1
    for rows in (1, 2, 4, 8, 16):
        bands = _NUM_PERM // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= 0.995:
            best = rows
    return best


# Templated data (many texts differing in one or two words) can put thousands of texts into
# one LSH bucket, and the pair count grows quadratically. Past these caps the search stops and
# says so in the manifest ("complete": false) instead of running for hours.
_MAX_CANDIDATES = 4_000_000
_MAX_BUCKET_PAIRS = 250_000
_MAX_VERIFIED = 400_000


def _bucket_pairs(members: np.ndarray, masks: np.ndarray, budget: int) -> np.ndarray | None:
    """All pairs in one bucket that can cross splits, as an (m, 2) array of unit ids.

    None when there would be more than `budget` pairs (checked before building them).
    """
    member_masks = masks[members]
    out: list[np.ndarray] = []
    values = np.unique(member_masks)
    groups = [members[member_masks == v] for v in values]
    sizes = [len(g) for g in groups]
    needed = sum(
        (n * (n - 1) // 2 if v & (v - 1) else 0) + n * sum(sizes[gi + 1 :])
        for gi, (v, n) in enumerate(zip(values.tolist(), sizes))
    )
    if needed > budget:
        return None
    for gi, (value, group_a) in enumerate(zip(values.tolist(), groups)):
        if value & (value - 1) and len(group_a) > 1:
            # Units that already span splits can pair with each other.
            i, j = np.triu_indices(len(group_a), k=1)
            out.append(np.stack((group_a[i], group_a[j]), axis=1))
        for group_b in groups[gi + 1 :]:
            out.append(
                np.stack((np.repeat(group_a, len(group_b)), np.tile(group_b, len(group_a))), axis=1)
            )
    return np.concatenate(out) if out else np.empty((0, 2), dtype=np.int64)


def _candidate_pairs(sig: np.ndarray, masks: np.ndarray, rows: int) -> tuple[np.ndarray, bool]:
    """Unit pairs (lo, hi) sharing a band bucket that can cross splits; and whether complete."""
    n = len(sig)
    codes: list[np.ndarray] = []
    total = 0
    complete = True
    prime = _U64(0x9E3779B97F4A7C15)
    for band in range(_NUM_PERM // rows):
        key = sig[:, band * rows].copy()
        for c in range(1, rows):
            key = key * prime + sig[:, band * rows + c]
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        run_start = np.flatnonzero(np.concatenate(([True], sorted_key[1:] != sorted_key[:-1])))
        run_len = np.diff(np.concatenate((run_start, [n])))
        ors = np.bitwise_or.reduceat(masks[order], run_start)
        # A bucket whose members all come from one split cannot hold a cross-split pair.
        useful = (run_len > 1) & ((ors & (ors - 1)) != 0)
        for start, length in zip(run_start[useful].tolist(), run_len[useful].tolist()):
            budget = min(_MAX_BUCKET_PAIRS, _MAX_CANDIDATES - total)
            pairs = _bucket_pairs(order[start : start + length], masks, budget)
            if pairs is None:
                complete = False  # skip this oversized bucket; other buckets still count
                continue
            total += len(pairs)
            lo, hi = pairs.min(axis=1), pairs.max(axis=1)
            codes.append(lo * n + hi)
        if total >= _MAX_CANDIDATES:
            complete = False
            break
        if total > _MAX_CANDIDATES // 4:
            # Keep memory bounded: the same pair recurs across bands.
            merged = np.unique(np.concatenate(codes))
            codes, total = [merged], len(merged)
    if not codes:
        return np.empty((0, 2), dtype=np.int64), complete
    unique = np.unique(np.concatenate(codes))
    return np.stack((unique // n, unique % n), axis=1), complete


@dataclass
class _NearResult:
    unit_items: list[list[int]]
    pairs: list[tuple[int, int, float]]  # (u, v, jaccard); (u, u, 1.0) for a unit spanning splits
    complete: bool = True


def _near_duplicate_units(texts: Sequence[str], split_of: Sequence[int], threshold: float) -> _NearResult:
    """Group items by normalised text ("units") and find unit pairs with Jaccard >= threshold.

    Only pairs that can cross splits are considered. Candidates come from MinHash LSH
    banding, are filtered by the signature estimate, then verified by exact Jaccard.
    """
    unit_of: dict[str, int] = {}
    unit_items: list[list[int]] = []
    unit_texts: list[str] = []
    unit_masks: list[int] = []
    for i, text in enumerate(texts):
        norm = normalize_for_dedup(text)
        if not norm:
            continue  # nothing left to compare (punctuation only)
        u = unit_of.get(norm)
        if u is None:
            u = unit_of[norm] = len(unit_texts)
            unit_texts.append(norm)
            unit_items.append([])
            unit_masks.append(0)
        unit_items[u].append(i)
        unit_masks[u] |= 1 << split_of[i]
    # Texts equal after normalisation (case, punctuation, spacing) are near duplicates at 1.0.
    found = [(u, u, 1.0) for u, m in enumerate(unit_masks) if m & (m - 1)]
    union = 0
    for m in unit_masks:
        union |= m
    if union & (union - 1) == 0:
        return _NearResult(unit_items, found)  # at most one split has texts: nothing can cross
    masks = np.array(unit_masks, dtype=np.int64)
    shingles, offsets = _shingles(unit_texts)
    sig = _minhash(shingles, offsets)
    candidates, complete = _candidate_pairs(sig, masks, _rows_per_band(threshold))
    if len(candidates):
        # Cheap vectorised estimate first. Its standard deviation at the threshold is
        # sqrt(t(1-t)/64); a 5-sigma margin loses a true pair with probability < 1e-6.
        margin = 5.0 * math.sqrt(max(threshold * (1.0 - threshold), 0.01) / _NUM_PERM)
        estimate = np.empty(len(candidates))
        for s in range(0, len(candidates), 200_000):
            chunk = candidates[s : s + 200_000]
            estimate[s : s + 200_000] = (sig[chunk[:, 0]] == sig[chunk[:, 1]]).mean(axis=1)
        keep = estimate >= threshold - margin
        candidates, estimate = candidates[keep], estimate[keep]
        if len(candidates) > _MAX_VERIFIED:
            complete = False
            best = np.argsort(-estimate, kind="stable")[:_MAX_VERIFIED]
            candidates = candidates[np.sort(best)]
    ends = np.concatenate((offsets[1:], [len(shingles)]))
    cache: dict[int, set[int]] = {}

    def shingle_set(u: int) -> set[int]:
        if u not in cache:
            cache[u] = set(shingles[offsets[u] : ends[u]].tolist())
        return cache[u]

    for lo, hi in candidates.tolist():
        a, b = shingle_set(lo), shingle_set(hi)
        jaccard = len(a & b) / len(a | b)
        if jaccard >= threshold:
            found.append((lo, hi, jaccard))
    found.sort(key=lambda t: (t[0], t[1]))
    return _NearResult(unit_items, found, complete)


# --------------------------------------------------------------------------------------------
# Duplicate reporting


@dataclass
class _Universe:
    """Every row of every split, flattened, for duplicate detection."""

    split: list[int]  # index into SPLIT_NAMES
    index: list[int]  # index within its split
    source: list[str | None]
    line: list[int | None]
    hashes: list[str]
    texts: list[str]

    def describe(self, i: int, prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}_split": SPLIT_NAMES[self.split[i]],
            f"{prefix}_index": self.index[i],
            f"{prefix}_source": self.source[i],
            f"{prefix}_line": self.line[i],
        }


def _universe(
    train: Sequence[Item], val: Sequence[Item], test: Sequence[Item] | None,
    test_texts: Sequence[str] | None, test_source: str | None, known: dict[int, str],
) -> _Universe:
    uni = _Universe([], [], [], [], [], [])
    parts: list[tuple[int, Sequence[Item]]] = [(0, train), (1, val)]
    if test is not None:
        parts.append((2, test))
    for split, rows in parts:
        for i, ex in enumerate(rows):
            text = content_text(ex)
            uni.split.append(split)
            uni.index.append(i)
            uni.source.append(ex.source)
            uni.line.append(ex.line)
            uni.texts.append(text)
            uni.hashes.append(known[id(ex)])
    if test is None and test_texts is not None:
        for i, text in enumerate(test_texts):
            uni.split.append(2)
            uni.index.append(i)
            uni.source.append(test_source)
            uni.line.append(None)  # only texts were given: no line without parsing the file
            uni.texts.append(text)
            uni.hashes.append(_sha256(text))
    return uni


def _ordered_pair(uni: _Universe, i: int, j: int) -> tuple[int, int]:
    return (i, j) if (uni.split[i], uni.index[i]) <= (uni.split[j], uni.index[j]) else (j, i)


def _exact_duplicates(uni: _Universe) -> tuple[int, list[dict[str, Any]], set[int], dict[str, int], dict[str, int]]:
    """Cross-split exact duplicate pairs: (count, first pairs, train items involved, within, count per split pair)."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(uni.hashes):
        by_hash[h].append(i)
    count = 0
    listed: list[dict[str, Any]] = []
    train_hit: set[int] = set()
    within: Counter[str] = Counter()
    by_pair: Counter[str] = Counter()
    for items in by_hash.values():
        per_split: dict[int, list[int]] = defaultdict(list)
        for i in items:
            per_split[uni.split[i]].append(i)
        for split, members in per_split.items():
            within[SPLIT_NAMES[split]] += len(members) - 1
        if len(per_split) < 2:
            continue
        if 0 in per_split:
            train_hit.update(per_split[0])
        for sa, sb in itertools.combinations(sorted(per_split), 2):
            count += len(per_split[sa]) * len(per_split[sb])
            by_pair[f"{SPLIT_NAMES[sa]}-{SPLIT_NAMES[sb]}"] += len(per_split[sa]) * len(per_split[sb])
            for a, b in itertools.product(per_split[sa], per_split[sb]):
                if len(listed) >= _MAX_LISTED_PAIRS:
                    break
                listed.append({**uni.describe(a, "a"), **uni.describe(b, "b")})
    listed.sort(key=lambda p: (p["a_split"], p["a_index"], p["b_split"], p["b_index"]))
    return count, listed, train_hit, {s: within.get(s, 0) for s in SPLIT_NAMES}, dict(by_pair)


def _near_duplicates(uni: _Universe, threshold: float
                     ) -> tuple[int, list[dict[str, Any]], set[int], bool, dict[str, int]]:
    """Cross-split near-duplicate pairs that are not exact duplicates.

    Returns (count, first pairs, train items involved, whether the search was complete,
    count per split pair such as "train-test").
    """
    result = _near_duplicate_units(uni.texts, uni.split, threshold)
    by_pair: Counter[str] = Counter()
    count = 0
    listed: list[dict[str, Any]] = []
    train_hit: set[int] = set()
    for u, v, jaccard in result.pairs:
        if u == v:
            pairs: Iterator[tuple[int, int]] = itertools.combinations(result.unit_items[u], 2)
        else:
            pairs = itertools.product(result.unit_items[u], result.unit_items[v])
        for i, j in pairs:
            if uni.split[i] == uni.split[j] or uni.hashes[i] == uni.hashes[j]:
                continue  # same split, or an exact duplicate (reported as such)
            count += 1
            a, b = _ordered_pair(uni, i, j)
            by_pair[f"{SPLIT_NAMES[uni.split[a]]}-{SPLIT_NAMES[uni.split[b]]}"] += 1
            if uni.split[a] == 0:
                train_hit.add(a)
            if len(listed) < _MAX_LISTED_PAIRS:
                listed.append({**uni.describe(a, "a"), **uni.describe(b, "b"), "jaccard": round(jaccard, 4)})
    return count, listed, train_hit, result.complete, dict(by_pair)


# --------------------------------------------------------------------------------------------
# make_splits


_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}
"""sha256 of large files this process has hashed, keyed by (path, device, inode, size, modification time in ns)."""
REMEMBER_DIGEST_BYTES = 64 << 20
"""Files at least this large have their digest remembered. Smaller ones are always read again: a file rewritten
in place with the same size within one tick of the file system's coarse clock (a few ms) keeps its mtime, which
a small file can be and a 64 MiB write cannot."""


def _one_file_sha256(path: Path) -> str:
    """sha256 hex of one file, streamed. A large file this process has hashed before and that is unchanged since
    (same inode, size and modification time) is not read again: the pins and the token-file cache both hash
    a large corpus, and each pass costs seconds per gigabyte."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    found = _DIGESTS.get(key) if st.st_size >= REMEMBER_DIGEST_BYTES else None
    if found is None:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        found = h.hexdigest()
        if st.st_size >= REMEMBER_DIGEST_BYTES:
            _DIGESTS[key] = found
    return found


def _file_sha256(spec: str | Path | Sequence[str | Path]) -> str:
    if hub.is_hub(spec):  # a dataset by name: its rows' content, as no file holds them
        return hub.sha256(str(spec))
    files = expand_paths(spec)
    digests = [(f.name, _one_file_sha256(f)) for f in files]
    if len(digests) == 1:
        return digests[0][1]
    return _sha256("\n".join(f"{name}\0{digest}" for name, digest in digests))


def file_digest(path: str | Path) -> str:
    """sha256 hex of one file's bytes, read by the one function training may open a test file with (to hash it);
    honelm.pins pins data files with it."""
    return _file_sha256(path)


def _histogram(rows: Sequence[Item]) -> dict[str, int]:
    counts = Counter(str(lbl) for lbl in (getattr(e, "label", None) for e in rows) if _is_class_label(lbl))
    return dict(sorted(counts.items()))


def _check_items(rows: Sequence[Any], what: str) -> None:
    for row in rows:
        if not isinstance(row, (Example, Document)):
            raise TypeError(f"{what} must hold Example or Document rows, got {type(row).__name__}")


def _check_arguments(examples: Sequence[Item], val: Sequence[Item] | None, load_test: Callable[[], list[Item]] | None,
                     test_texts: Sequence[str] | None, near_dup_threshold: float) -> None:
    """The argument errors of `make_splits`, in the order it reports them."""
    _check_items(examples, "examples")
    if not examples:
        raise HonelmError("make_splits needs at least one example")
    if val is not None:
        _check_items(val, "val")
    if not 0.0 < near_dup_threshold <= 1.0:
        raise ConfigError(f"near_dup_threshold must be in (0, 1], got {near_dup_threshold}")
    if test_texts is not None and load_test is None:
        raise ValueError("test_texts_for_leak_check is only meaningful with load_test")


def _ratio_weights(r: tuple[float, float, float], supplied: dict[str, bool]) -> tuple[list[str], list[float]]:
    """The splits cut by ratio (those not supplied) and their weights, normalised to sum to 1.

    A 0 ratio with nothing supplied is allowed: that split is simply empty (e.g. "9:1:0" for a
    pre-training corpus with no test share; `honelm test` then says there is nothing to test).
    """
    active = [name for name in SPLIT_NAMES if not supplied.get(name, False)]
    weights = [r[SPLIT_NAMES.index(name)] for name in active]
    return active, [w / sum(weights) for w in weights]


def _is_classification(rows: Sequence[Item]) -> bool:
    """Class labels (str/int) and no float (regression) label: the rows can be stratified."""
    labels = [getattr(e, "label", None) for e in rows]
    return any(_is_class_label(lbl) for lbl in labels) and not any(isinstance(lbl, float) for lbl in labels)


def _test_identity(load_test: Callable[[], list[Item]] | None,
                   test_path: str | Path | Sequence[str | Path] | None) -> tuple[str, str | None]:
    """Where the test split comes from ("ratio", "user" or the file path(s)) and the file's sha256."""
    if load_test is None:
        return "ratio", None
    if test_path is None:
        return "user", None
    source = str(test_path) if isinstance(test_path, (str, Path)) else ",".join(str(p) for p in test_path)
    return source, _file_sha256(test_path)


def _duplicates(uni: _Universe, threshold: float, leak_checked: bool) -> tuple[dict[str, Any], set[int]]:
    """The manifest's `duplicates` record of cross-split exact and near duplicates, and the train
    rows involved in either (what `dedup` removes)."""
    exact_count, exact_pairs, exact_train, within, exact_by_pair = _exact_duplicates(uni)
    near_count, near_pairs, near_train, near_complete, near_by_pair = _near_duplicates(uni, threshold)
    if not near_complete:
        warnings.warn(
            "near-duplicate search stopped early: too many similar texts (templated data?); "
            "the manifest records it as incomplete",
            stacklevel=3,  # the caller of make_splits
        )
    record = {
        "exact": {"count": exact_count, "by_split_pair": exact_by_pair, "pairs": exact_pairs, "within_split": within},
        "near": {
            "count": near_count,
            "by_split_pair": near_by_pair,
            "threshold": threshold,
            "pairs": near_pairs,
            "complete": near_complete,
        },
        "test_leak_checked": leak_checked,
    }
    return record, exact_train | near_train


def _drop_from_train(train: list[Item], drop: set[int]) -> tuple[list[Item], list[dict[str, Any]]]:
    """`train` without the rows at the indices `drop`, and where each removed row came from."""
    removed = [{"source": ex.source, "line": ex.line} for i, ex in enumerate(train) if i in drop]
    kept = [ex for i, ex in enumerate(train) if i not in drop]
    if not kept:
        raise HonelmError("dedup removed every train example: train duplicates val/test")
    return kept, removed


def _check_labels(train: list[Item], val: list[Item], test: list[Item] | None, removed: int) -> None:
    """Every val (and ratio test) label appears in train; the error says when dedup made it so."""
    try:
        check_labels_seen(train, val, "val")
        if test is not None:
            check_labels_seen(train, test, "test")
    except DataError as e:
        if removed:
            raise DataError(e.path, e.line, e.field, f"{e.message} (after dedup removed {removed} train rows)") from None
        raise


@dataclass
class _SplitRecord:
    """Per split: sorted example hashes, the split hash and the label histogram; the test count and,
    for a user test file, the hash of the texts that were leak-checked."""

    example_hashes: dict[str, list[str]]
    split_hashes: dict[str, str | None]
    histogram: dict[str, dict[str, int]]
    test_count: int | None
    test_texts_hash: str | None


def _split_record(train: list[Item], val: list[Item], test: list[Item] | None, test_texts: Sequence[str] | None,
                  test_sha: str | None, known: dict[int, str]) -> _SplitRecord:
    hashes = {name: [known[id(e)] for e in rows] for name, rows in (("train", train), ("val", val))}
    example_hashes = {name: sorted(hs) for name, hs in hashes.items()}
    split_hashes: dict[str, str | None] = {name: _split_hash(hs) for name, hs in hashes.items()}
    histogram = {"train": _histogram(train), "val": _histogram(val)}
    if test is not None:
        test_hashes = [known[id(e)] for e in test]
        example_hashes["test"] = sorted(test_hashes)
        split_hashes["test"] = _split_hash(test_hashes)
        histogram["test"] = _histogram(test)
        return _SplitRecord(example_hashes, split_hashes, histogram, len(test), None)
    texts_hash = _split_hash([_sha256(t) for t in test_texts]) if test_texts is not None else None
    # The file's own hash identifies a user test split; its rows are not listed here.
    split_hashes["test"] = test_sha if test_sha is not None else texts_hash
    return _SplitRecord(example_hashes, split_hashes, histogram, len(test_texts) if test_texts is not None else None,
                        texts_hash)


@dataclass
class Reuse:
    """What `reuse_manifest` hands its caller: whether the split inside the block came from the manifest."""

    manifest: dict[str, Any]
    reused: bool = False


_REUSE: contextvars.ContextVar[Reuse | None] = contextvars.ContextVar("honelm_reuse_split", default=None)


@contextmanager
def reuse_manifest(manifest: dict[str, Any]) -> Iterator[Reuse]:
    """Inside this block `make_splits` takes its assignment from `manifest` (a run's split_manifest.json) instead of
    computing it, when the rows' content hashes are exactly those the manifest lists for each split (and the labels
    per split count the same): then the split IS the recorded one, and the duplicate scan, which depends on the texts
    only, is not repeated (its record is the manifest's). Anything else (a changed or missing row, other ratios or
    seed, dedup, a user test file) takes the full computation, which `verify_manifest` then judges as always.
    `honelm test` uses it: the run already knows its split."""
    state = Reuse(manifest)
    token = _REUSE.set(state)
    try:
        yield state
    finally:
        _REUSE.reset(token)


def _split_of(recorded: dict[str, Any], examples: Sequence[Item], val: Sequence[Item] | None,
              known: dict[int, str], seed: int) -> dict[str, list[Item]] | None:
    """Each split's rows, by the manifest's example hashes and in the order `make_splits` gives them (by
    sha256(seed, content hash), then source, line and label); None when a row's hash is not listed or lands in a
    split that was supplied."""
    where = {h: name for name in SPLIT_NAMES for h in recorded.get("example_hashes", {}).get(name, [])}
    assigned: dict[str, list[Item]] = {name: [] for name in SPLIT_NAMES}
    for ex in examples:
        name = where.get(known[id(ex)])
        if name is None or (name == "val" and val is not None):
            return None
        assigned[name].append(ex)
    for name, rows in assigned.items():
        rows.sort(key=lambda e: (_sha256(f"{seed}\x1f{known[id(e)]}"), e.source, e.line,
                                 _label_key(getattr(e, "label", None))))
    if val is not None:
        assigned["val"] = list(val)
    return assigned


def _from_manifest(examples: Sequence[Item], val: Sequence[Item] | None, known: dict[int, str], seed: int,
                   ratios: tuple[float, float, float], stratified: bool, reusable: bool) -> Splits | None:
    """The splits `reuse_manifest` asked for, or None to compute them (see there)."""
    state = _REUSE.get()
    recorded = state.manifest if state is not None else None
    if (not recorded or not reusable or recorded.get("seed") != seed or recorded.get("ratios") != list(ratios)
            or recorded.get("stratified") != stratified or recorded.get("test_source") != "ratio"
            or recorded.get("dedup", {}).get("enabled")):
        return None
    assigned = _split_of(recorded, examples, val, known, seed)
    if assigned is None:
        return None
    record = _split_record(assigned["train"], assigned["val"], assigned["test"], None, None, known)
    if record.split_hashes != recorded.get("hashes") or record.histogram != recorded.get("label_histogram"):
        return None
    _check_labels(assigned["train"], assigned["val"], assigned["test"], 0)
    manifest = {**recorded, "counts": {"train": len(assigned["train"]), "val": len(assigned["val"]),
                                       "test": record.test_count},
                "label_histogram": record.histogram, "hashes": record.split_hashes,
                "example_hashes": record.example_hashes}
    state.reused = True  # type: ignore[union-attr]
    return Splits(train=assigned["train"], val=assigned["val"], manifest=manifest, _test_examples=assigned["test"])


def make_splits(
    examples: Sequence[Item],
    ratios: str | Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    stratify: bool = True,
    val: Sequence[Item] | None = None,
    load_test: Callable[[], list[Item]] | None = None,
    test_texts_for_leak_check: Sequence[str] | None = None,
    test_path: str | Path | Sequence[str | Path] | None = None,
    dedup: bool = False,
    near_dup_threshold: float = 0.9,
) -> Splits:
    """Split rows into train/val/test deterministically, by content and seed only.

    Ratio mode: rows are grouped by `content_hash` (exact duplicates stay together), grouped
    into strata by classification label when `stratify` (regression labels and Documents form
    one stratum), and each stratum is cut in the order of sha256(seed, content hash) using
    largest-remainder counts, so every label's split sizes are within one row of its quota and
    every label keeps at least one row in train (ties: train, then val, then test).

    Supplied splits: `val` is used as the val split as given, and the ratios apply only to the
    rest (8:1:1 with a supplied val cuts train:test = 8:1). A user test file is given as
    `load_test` (a zero-argument loader that is only called by `Splits.test`, inside
    `unlock_test_split`, so its labels are never parsed here) with `test_texts_for_leak_check`
    (its `content_text` strings, used only to find duplicates) and `test_path` (recorded with
    its sha256; a list of paths is hashed together). With val and test both supplied, all `examples` go to train. A split whose ratio
    is 0 and that is not supplied is empty.

    Exact and near duplicates (Jaccard >= `near_dup_threshold` over word 3-gram shingles)
    that cross splits are reported in the manifest; with `dedup`, the train rows involved are
    removed (never val/test rows). Labels in val (and ratio test) must appear in train
    (DataError); a user test file is checked when it is loaded.
    """
    _check_arguments(examples, val, load_test, test_texts_for_leak_check, near_dup_threshold)
    r = parse_ratios(ratios)
    active, weights = _ratio_weights(r, {"val": val is not None, "test": load_test is not None})
    stratified = bool(stratify and _is_classification(examples))
    # Hash every row once; later steps look hashes up by object identity.
    known: dict[int, str] = {id(e): content_hash(e) for e in examples}
    if val is not None:
        known.update((id(e), content_hash(e)) for e in val)
    reused = _from_manifest(examples, val, known, seed, r, stratified, load_test is None and not dedup)
    if reused is not None:
        return reused
    groups = _assign_by_ratio(examples, [known[id(e)] for e in examples], active, weights, seed, stratified)
    assigned: dict[str, list[Item]] = {name: [] for name in SPLIT_NAMES}
    for g in groups:
        assigned[g.split].extend(g.members)
    train = assigned["train"]
    val_rows = list(val) if val is not None else assigned["val"]
    test_rows: list[Item] | None = None if load_test is not None else assigned["test"]
    test_source, test_sha = _test_identity(load_test, test_path)

    uni = _universe(train, val_rows, test_rows, test_texts_for_leak_check, test_source, known)
    leak_checked = test_rows is not None or test_texts_for_leak_check is not None
    duplicates, duplicated_train = _duplicates(uni, near_dup_threshold, leak_checked)
    removed: list[dict[str, Any]] = []
    if dedup:
        train, removed = _drop_from_train(train, duplicated_train)
    _check_labels(train, val_rows, test_rows, len(removed))

    record = _split_record(train, val_rows, test_rows, test_texts_for_leak_check, test_sha, known)
    manifest: dict[str, Any] = {
        "seed": seed,
        "ratios": list(r),
        "ratio_splits": active,
        "stratified": stratified,
        "counts": {"train": len(train), "val": len(val_rows), "test": record.test_count},
        "label_histogram": record.histogram,
        "hashes": record.split_hashes,
        "example_hashes": record.example_hashes,
        "duplicates": duplicates,
        "dedup": {"enabled": dedup, "removed_from_train": len(removed), "removed": removed},
        "test_source": test_source,
    }
    if load_test is not None:
        manifest["test_file_sha256"] = test_sha
    return Splits(train=train, val=val_rows, manifest=manifest, _test_examples=test_rows, _load_test=load_test,
                  _test_texts_hash=record.test_texts_hash)


def verify_manifest(splits_manifest: dict[str, Any], recomputed: dict[str, Any]) -> None:
    """Raise HonelmError unless both manifests have the same hash for every split.

    `honelm test` rebuilds the splits and calls this to prove it evaluates the same test split
    that training held out.
    """
    old, new = splits_manifest.get("hashes"), recomputed.get("hashes")
    if not isinstance(old, dict) or not isinstance(new, dict):
        raise HonelmError("manifest has no split hashes; cannot prove the splits are the same")
    differ = [name for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    if differ:
        raise HonelmError(
            f"the rebuilt splits differ from the recorded ones ({', '.join(differ)}): the data, "
            f"seed (recorded {splits_manifest.get('seed')}, now {recomputed.get('seed')}) or "
            f"ratios changed since training"
        )
