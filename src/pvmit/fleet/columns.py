"""Columnar primitives for the planner: a text column as codes into its distinct values, Python's `str.strip` on
Arrow strings, 64-bit hashes of strings, and the threads that run them.

They work on Arrow's buffers with numpy, a slice of rows at a time, so ten million rows cost a few passes over memory
and no Python object per row. numpy and Arrow release the GIL in their loops, so work given to `Workers` runs on
every CPU this process may use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

T = TypeVar("T")
Codes = npt.NDArray[np.signedinteger[Any]]
"""Row codes into a column's distinct values (the smallest signed type that holds them; -1 for an absent cell)."""
HashArray = npt.NDArray[np.uint64]
BoolArray = npt.NDArray[np.bool_]

SLICE = 1 << 17
"""Rows handled at once by the numpy passes: their temporaries stay in the CPU's cache."""


def cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Workers:
    """A thread pool as wide as this process's CPUs (at most 8); with one CPU, work runs in the caller's thread."""

    def __init__(self) -> None:
        n = min(cpus(), 8)
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="pvmit-fleet") if n > 1 else None

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        f: Future[T] = Future()
        f.set_result(fn(*args))
        return f

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def smallest_int(n: int) -> type[np.signedinteger[Any]]:
    """The smallest signed integer type that holds -1 .. n."""
    for t in (np.int8, np.int16, np.int32):
        if n <= np.iinfo(t).max:
            return t
    return np.int64


def as_text(arr: pa.Array) -> pa.Array:
    """A string or large string array as it is, anything else cast to string."""
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return arr
    return arr.cast(pa.string())


def _views(arr: pa.Array) -> tuple[npt.NDArray[np.integer[Any]], npt.NDArray[np.uint8]]:
    """A string array's offsets (len + 1 of them, sliced to the array) and its whole data buffer, without copies."""
    otype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    bufs = arr.buffers()
    offsets: npt.NDArray[np.integer[Any]] = np.frombuffer(bufs[1], dtype=otype, count=len(arr) + 1,
                                                         offset=arr.offset * np.dtype(otype).itemsize)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, dtype=np.uint8)
    return offsets, data


def slices(col: pa.ChunkedArray, size: int = SLICE) -> Iterator[tuple[int, pa.Array]]:
    """(first row, array) for the column in pieces of at most `size` rows."""
    pos = 0
    for chunk in col.chunks:
        for s in range(0, len(chunk), size):
            piece = chunk.slice(s, size)
            yield pos, piece
            pos += len(piece)


# --- codes ----------------------------------------------------------------------------------------------------

def encode(col: pa.ChunkedArray, relabel: Callable[[pa.Array], Codes] | None = None) -> tuple[pa.Array, Codes]:
    """The distinct values of a text column (no nulls among them) and each row's index into them (-1 for an absent
    cell). With `relabel`, each row gets instead what relabel(values) gives its value (one entry per value, then one
    for an absent cell), with no array of indices made on the way. A dictionary column is read through its
    dictionaries (chunks that share one cost one lookup), so a Parquet column read as a dictionary never has its
    rows turned into strings."""
    n = len(col)
    chunks = [c for c in col.chunks if len(c)]
    if pa.types.is_null(col.type) or col.null_count == n or not chunks:
        values = pa.array([], type=pa.string())
        table = relabel(values) if relabel else np.full(1, -1, dtype=np.int8)
        return values, np.full(n, table[-1], dtype=table.dtype)
    if not pa.types.is_dictionary(col.type):
        chunks = [c for c in pc.dictionary_encode(pa.chunked_array(chunks, type=col.type)).chunks if len(c)]
    dicts: list[pa.Array] = []
    which: list[int] = []
    for c in chunks:
        d = c.dictionary
        if not dicts or not (d is dicts[-1] or d.equals(dicts[-1])):
            dicts.append(d)
        which.append(len(dicts) - 1)
    enc = pc.dictionary_encode(dicts[0] if len(dicts) == 1 else pa.concat_arrays(dicts))
    values = enc.dictionary
    ids = np.asarray(pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    table = relabel(values) if relabel else \
        np.append(np.arange(len(values)), -1).astype(smallest_int(len(values)))
    remaps = []
    start = 0
    for d in dicts:  # per dictionary: what its entries map to, then what a null cell maps to
        remaps.append(np.append(table[ids[start:start + len(d)]], table[-1]))
        start += len(d)
    codes = np.empty(n, dtype=table.dtype)
    pos = 0
    for c, w in zip(chunks, which, strict=True):
        idx = c.indices if not c.null_count else pc.fill_null(c.indices, len(dicts[w]))
        np.take(remaps[w], idx.to_numpy(zero_copy_only=False), out=codes[pos:pos + len(c)])
        pos += len(c)
    return values, codes


# --- strip ----------------------------------------------------------------------------------------------------

_EDGE = np.zeros(256, dtype=bool)
_EDGE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True  # what str.isspace() finds in ASCII
_EDGE[128:] = True  # any non-ASCII character may be Unicode whitespace


def strip(arr: pa.Array) -> pa.Array:
    """`str.strip()` of every string, nulls kept: only strings that begin or end with ASCII whitespace or a non-ASCII
    character go through Python."""
    arr = as_text(arr)
    if not len(arr):
        return arr
    offsets, data = _views(arr)
    lens = np.diff(offsets)
    nz = lens > 0
    edge = np.zeros(len(arr), dtype=bool)
    edge[nz] = _EDGE[data[offsets[:-1][nz]]] | _EDGE[data[offsets[1:][nz] - 1]]
    if not edge.any():
        return arr
    idx = np.flatnonzero(edge)
    fixed = [s.strip() for s in arr.take(pa.array(idx)).to_pylist()]
    return pc.replace_with_mask(arr, pa.array(edge), pa.array(fixed, type=arr.type))


# --- hashes ---------------------------------------------------------------------------------------------------

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_MASKS = np.array([(1 << (8 * r)) - 1 for r in range(8)] + [(1 << 64) - 1], dtype=np.uint64)
_HEAD_WORDS = 16  # 8-byte words hashed from the start of a string; as many again from its end, where it is longer
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True


def _mix_words(h: HashArray, words: npt.NDArray[np.uint64], starts: npt.NDArray[np.int64],
               lens: npt.NDArray[np.int64], limit: int, span: int) -> None:
    """h = (h ^ word) * M2, then h ^= h >> 32, for the 8-byte words at starts + 8k, k < limit; bytes past a
    string's end are masked off, so nothing outside the string counts."""
    n = h.size
    pos = np.empty(n, dtype=np.int64)
    rem = np.empty(n, dtype=np.int64)
    t = np.empty(n, dtype=np.uint64)
    for k in range(limit):
        np.add(starts, 8 * k, out=pos)
        np.minimum(pos, span, out=pos)
        w = words[pos]  # not np.take, which copies a strided source whole first
        np.subtract(lens, 8 * k, out=rem)
        np.clip(rem, 0, 8, out=rem)
        w &= _MASKS[rem]
        h ^= w
        h *= _M2
        np.right_shift(h, np.uint64(32), out=t)
        h ^= t


def hash_strings(arr: pa.Array, out: HashArray, maybe_blank: BoolArray) -> None:
    """A 64-bit hash of each string into `out`: its length, its first 128 bytes and, when longer, its last 128
    bytes, read 8 at a time. Equal strings hash equal; unequal ones rarely do, and callers compare the strings of
    equal hashes, so a weak spot costs time, never an answer. `maybe_blank`: null, empty, or starting with ASCII
    whitespace."""
    arr = as_text(arr)
    m = len(arr)
    if not m:
        return
    offsets, data = _views(arr)
    a, b = int(offsets[0]), int(offsets[-1])
    span = b - a
    padded = np.zeros(span + 8, dtype=np.uint8)  # every 8-byte read from a position <= span stays inside
    padded[:span] = data[a:b]
    words = np.ndarray((span + 1,), dtype="<u8", buffer=padded, offset=0, strides=(1,))  # the word at each byte
    starts = offsets[:-1].astype(np.int64)
    starts -= a
    lens = np.diff(offsets).astype(np.int64)
    out[:] = lens
    out *= _M1
    longest = int(lens.max())
    _mix_words(out, words, starts, lens, min((longest + 7) // 8, _HEAD_WORDS), span)
    if longest > 8 * _HEAD_WORDS:
        long = np.flatnonzero(lens > 8 * _HEAD_WORDS)
        tail = out[long]
        _mix_words(tail, words, starts[long] + lens[long] - 8 * _HEAD_WORDS,
                   np.full(long.size, 8 * _HEAD_WORDS, dtype=np.int64), _HEAD_WORDS, span)
        out[long] = tail
    t = out >> np.uint64(29)  # finish (splitmix64's): every input bit reaches every output bit
    out ^= t
    out *= _M3
    np.right_shift(out, np.uint64(31), out=t)
    out ^= t
    nz = lens > 0
    first = np.zeros(m, dtype=bool)
    first[nz] = _WHITESPACE[padded[starts[nz]]]
    blank = ~nz | first
    if arr.null_count:
        blank |= np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    maybe_blank[:] = blank


def hash_column(col: pa.ChunkedArray, workers: Workers | None = None) -> tuple[HashArray, BoolArray]:
    """`hash_strings` over a whole column, its slices shared among the workers."""
    n = len(col)
    out = np.empty(n, dtype=np.uint64)
    blank = np.empty(n, dtype=bool)
    jobs = [(pos, piece) for pos, piece in slices(col, 1 << 20)]  # fewer numpy calls: fewer waits for the GIL
    if workers is None:
        for pos, piece in jobs:
            hash_strings(piece, out[pos:pos + len(piece)], blank[pos:pos + len(piece)])
    else:
        for f in [workers.submit(hash_strings, piece, out[pos:pos + len(piece)], blank[pos:pos + len(piece)])
                  for pos, piece in jobs]:
            f.result()
    return out, blank


def repeated(hashes: HashArray) -> HashArray:
    """The hash values that occur more than once (sorted, each once). Sorts `hashes` in place."""
    if hashes.size < 2:
        return np.empty(0, dtype=np.uint64)
    hashes.sort()
    dup = hashes[1:][hashes[1:] == hashes[:-1]]
    return np.unique(dup) if dup.size else dup
