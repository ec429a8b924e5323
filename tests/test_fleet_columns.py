"""The planner's columnar primitives against plain Python: hashes equal exactly where strings are equal (wherever the
strings sit in Arrow's buffers), strip() as str.strip(), codes as a dict of distinct values would give them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pvmit.fleet.columns import SLICE, Workers, encode, hash_column, hash_strings, repeated, strip

TRICKY = ["", " ", "a", "a ", " a", "\ta\n", "\x1ca\x1f", "\u00a0b\u3000", "é", " é ", "\u2028", "x" * 7, "x" * 8,
          "x" * 9, "y" * 127, "y" * 128, "y" * 129, "z" * 300, "k8s-0000001", "k8s-0000002", "\u3000", "\x85a"]


def _hashes(values: list[str | None], chunks: int = 1) -> np.ndarray:
    step = max(1, len(values) // chunks)
    col = pa.chunked_array([pa.array(values[i:i + step], type=pa.string()) for i in range(0, len(values), step)])
    return hash_column(col)[0]


def test_equal_strings_hash_equal_wherever_they_sit() -> None:
    values = TRICKY + TRICKY[::-1] + [v + "!" for v in TRICKY]
    one, three = _hashes(values), _hashes(values, chunks=3)
    assert (one == three).all()
    sliced = pa.array(["pad"] * 5 + values, type=pa.string()).slice(5)  # an offset into the buffers
    out, blank = np.empty(len(values), np.uint64), np.empty(len(values), bool)
    hash_strings(sliced, out, blank)
    assert (out == one).all()
    large = pa.array(values, type=pa.large_string())
    hash_strings(large, out, blank)
    assert (out == one).all()
    by_value: dict[str, int] = {}
    for v, h in zip(values, one.tolist(), strict=True):
        assert by_value.setdefault(v, h) == h
    # distinct strings here (short ones, ones differing in their first or last 128 bytes) hash apart
    assert len(set(by_value.values())) == len(by_value)


def test_strings_differing_anywhere_in_their_first_or_last_128_bytes_hash_apart() -> None:
    base = "n" * 400
    variants = [base] + [base[:i] + "m" + base[i + 1:] for i in (0, 7, 8, 63, 127, 272, 300, 399)]
    h = _hashes(variants)
    assert len(set(h.tolist())) == len(variants)
    # (the middle of a longer string is not read: such names collide, and the duplicate check compares the strings
    # of equal hashes, test_duplicate_names_are_found_when_every_hash_collides)


def test_maybe_blank() -> None:
    values = [None, "", " ", " x", "\tx", "x", "x ", "\u3000"]
    _, blank = hash_column(pa.chunked_array([pa.array(values, type=pa.string())]))
    assert blank.tolist() == [True, True, True, True, True, False, False, False]


def test_hashing_with_workers_matches_one_thread() -> None:
    values = [f"vm-{i:07d}" for i in range(3 * SLICE + 5)]
    col = pa.chunked_array([pa.array(values[:SLICE + 1]), pa.array(values[SLICE + 1:])])
    with Workers() as w:
        a = hash_column(col, w)
    b = hash_column(col)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert repeated(a[0].copy()).size == 0
    assert repeated(np.array([5, 3, 5, 9, 3, 5], dtype=np.uint64)).tolist() == [3, 5]


@pytest.mark.parametrize("large", [False, True])
def test_strip_is_str_strip(large: bool) -> None:
    values: list[str | None] = [*TRICKY, None]
    arr = pa.array(values, type=pa.large_string() if large else pa.string())
    assert strip(arr).to_pylist() == [None if v is None else v.strip() for v in values]
    assert strip(arr.slice(3)).to_pylist() == [None if v is None else v.strip() for v in values[3:]]


def test_codes_through_dictionaries_and_relabelled() -> None:
    """Chunks with different dictionaries (as Parquet row groups have), a null inside a dictionary and null cells:
    codes index the distinct values in order of first appearance, -1 where a cell is absent."""
    d1 = pa.DictionaryArray.from_arrays(pa.array([0, 1, None, 1, 2], type=pa.int32()), pa.array(["b", "a", None]))
    d2 = pa.DictionaryArray.from_arrays(pa.array([1, 0, 0], type=pa.int32()), pa.array(["c", "b"]))
    d3 = pa.DictionaryArray.from_arrays(pa.array([1, 1], type=pa.int32()), pa.array(["c", "b"]))
    col = pa.chunked_array([d1, d2, d3])
    cells = col.to_pylist()
    values, codes = encode(col)
    got = [None if c < 0 else values[int(c)].as_py() for c in codes]
    assert got == cells and values.to_pylist() == ["b", "a", "c"]
    plain_values, plain_codes = encode(pa.chunked_array([pa.array(cells[:4]), pa.array(cells[4:])]))
    assert [None if c < 0 else plain_values[int(c)].as_py() for c in plain_codes] == cells
    _, lengths = encode(col, lambda v: np.array([len(s) * 10 for s in v.to_pylist()] + [-7], dtype=np.int16))
    assert lengths.dtype == np.int16 and lengths.tolist() == [-7 if c is None else 10 for c in cells]
    absent = pa.chunked_array([pa.nulls(4)])
    assert encode(absent)[1].tolist() == [-1] * 4
    assert encode(absent, lambda v: np.array([3], dtype=np.int8))[1].tolist() == [3] * 4
