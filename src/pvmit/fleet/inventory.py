"""The fleet inventory: a table of hosts and a table of VMs, read from JSON, CSV or Parquet.

An inventory is one JSON file `{"hosts": [...], "vms": [...]}`, or a directory holding `hosts.<ext>` and
`vms.<ext>` (ext: parquet, csv or json, each table on its own), or the two table files named in that order.
Every cell is text (lists are also accepted in JSON); empty cells are absent. Columns:

hosts  name         unique host name
       cpu          a catalog model (any name `pvmit catalog` accepts), or the JSON `pvmit host --json` writes
                    (the whole document or its `facts`), inline or as a path to a .json file
       cluster      optional: the hosts among which the VMM computes MITIGATION_ENUM for the VMs booted there
                    (hosts without one form one cluster together)
       force_on, force_off, unreported
                    optional operator settings for every VM on this host (`pvmit policy` spells them the same);
                    where given they go over the VM's own field by field (`policy.PartialSettings.over`), as
                    on a migration destination (`pvmit vmm --incoming --force-on ...`)
vms    name         unique VM name
       host         the host it runs on now
       personality  the CPU personality it was booted with: catalog model, built-in template or .toml file, or
                    the JSON of a personality (`Personality.to_json`, inline; `pvmit libvirt inventory` writes
                    these for libvirt domains)
       mitigations  what it reported through the interface: retpoline, bhb-short, both (comma-separated), none,
                    or unenlightened (it never reported)
       relies_on    optional, only for a VM that never reported: what its kernel relies on as read inside the
                    guest (its spectre_v2 sysfs line, through an agent such as QEMU's guest agent). The policy
                    then decides with it as it would with a report, in place of assuming from the personality
       form         the interface form its VMM offers: intel, kvm, neutral, or none (then it is unenlightened)
       supported    optional MITIGATION_ENUM it was promised; by default what every host of its host's cluster
                    can honour (`policy.supported_requests`), plus anything it reported (a guest can only report
                    bits it was offered)
       force_on, force_off, unreported
                    optional operator settings that travel with the VM

Readers only turn files into string tables and row numbers; what a value means is checked by `classes`, once per
distinct value. A wrong row is reported with file, row and field, and the other rows are still used.
"""

from __future__ import annotations

import codecs
import ctypes
import ctypes.util
import json
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pvmit.derive import Mitigation, mitigations_to_bits
from pvmit.errors import InputError
from pvmit.interface.forms import Form
from pvmit.interface.policy import FORCEABLE
from pvmit.safetext import quoted
from pvmit.userfiles import GiB, MiB, read_bytes, read_json
from pvmit.x86.bits import SpecCtrl

SCHEMA = "pvmit.fleet-inventory/1"
SETTINGS_COLUMNS = ("force_on", "force_off", "unreported")
HOST_COLUMNS: dict[str, bool] = {"name": True, "cpu": True, "cluster": False,
                                 **dict.fromkeys(SETTINGS_COLUMNS, False)}
VM_COLUMNS: dict[str, bool] = {"name": True, "host": True, "personality": True, "mitigations": True, "form": True,
                               "supported": False, "relies_on": False, **dict.fromkeys(SETTINGS_COLUMNS, False)}
COLUMNS = {"hosts": HOST_COLUMNS, "vms": VM_COLUMNS}
"""Column name -> required, per table."""
TABLE_EXTENSIONS = (".parquet", ".csv", ".json")
CAPS = {".parquet": 512 * MiB, ".csv": 1 * GiB, ".json": 512 * MiB}
"""Largest inventory file read, by kind (a generated 1,000,000-VM inventory is 6 MiB of Parquet, 70 MiB of CSV,
150 MiB of JSON; JSON costs about five times its size in memory once parsed)."""
UNENLIGHTENED = ("unenlightened", "unreported")
MAX_ROWS = 2**31 - 1
"""Most rows a Parquet table may say it has (the planner indexes rows with 32-bit integers)."""

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class RowError:
    """One wrong cell: `row` counts data rows from 1 in the file (0: the file or its header)."""

    file: str
    table: str
    row: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.table} row {self.row}" if self.row else self.table
        return f"{self.file}: {where}: field {self.field!r}: {self.message}"

    def to_json(self) -> dict[str, object]:
        return {"file": self.file, "table": self.table, "row": self.row, "field": self.field,
                "message": self.message}


@dataclass
class ErrorLog:
    """Row errors grouped by (file, table, field, message), each with the rows it applies to, so that a
    million rows with one bad value cost an array rather than a million objects."""

    groups: list[tuple[str, str, str, str, IntArray]] = field(default_factory=list)

    def add(self, file: str, table: str, field_: str, message: str, rows: Iterable[int] | IntArray) -> None:
        arr = np.asarray(rows if isinstance(rows, np.ndarray) else list(rows), dtype=np.int64)
        if arr.size:
            self.groups.append((file, table, field_, message, arr))

    @property
    def total(self) -> int:
        return sum(int(g[4].size) for g in self.groups)

    def __bool__(self) -> bool:
        return bool(self.groups)

    def first(self, n: int | None = None) -> list[RowError]:
        """The first `n` errors (all when None), hosts before VMs, in row order."""
        if not self.groups:
            return []
        order = {"hosts": 0, "vms": 1}
        tbl = np.concatenate([np.full(g[4].size, order.get(g[1], 2), dtype=np.int64) for g in self.groups])
        rows = np.concatenate([g[4] for g in self.groups])
        gid = np.concatenate([np.full(g[4].size, i, dtype=np.int64) for i, g in enumerate(self.groups)])
        idx = np.lexsort((gid, rows, tbl))
        if n is not None:
            idx = idx[:n]
        return [RowError(self.groups[int(gid[i])][0], self.groups[int(gid[i])][1], int(rows[i]),
                         self.groups[int(gid[i])][2], self.groups[int(gid[i])][3]) for i in idx]


@dataclass(frozen=True)
class TableSource:
    """One table of the inventory: every known column as strings (null where absent or empty), from `read`.

    JSON and CSV tables are read whole; a Parquet table's columns are read (and validated) when asked for, so a
    column's Arrow buffers live only while the planner codes it, and columns are read side by side."""

    file: str
    table: str
    num_rows: int
    rows: IntArray  # the row number in the file of each table row (rows the reader dropped are missing)
    bad: BoolArray  # rows the reader already found wrong (their errors are logged)
    base_dir: Path  # relative paths in cells are read from here
    read: Callable[[str], pa.ChunkedArray | None]  # a known column as text; None where the table lacks it
    ignored: tuple[str, ...] = ()  # columns pvmit does not know (reported as a warning)

    def column(self, name: str) -> pa.ChunkedArray:
        """A known column; one the table lacks is all absent (type null: no buffers, whatever its length)."""
        col = self.read(name)
        return col if col is not None else pa.chunked_array([pa.nulls(self.num_rows)])

    @staticmethod
    def of_table(file: str, table: str, data: pa.Table, rows: IntArray, bad: BoolArray, base_dir: Path,
                 ignored: tuple[str, ...] = ()) -> TableSource:
        def read(name: str) -> pa.ChunkedArray | None:
            return data.column(name) if name in data.column_names else None
        return TableSource(file, table, int(data.num_rows), rows, bad, base_dir, read, ignored)


@dataclass(frozen=True)
class RawInventory:
    hosts: TableSource
    vms: TableSource
    errors: ErrorLog

    @property
    def warnings(self) -> list[str]:
        return [f"{t.file}: {t.table}: column {quoted(c)} is not part of the inventory schema and is ignored"
                for t in (self.hosts, self.vms) for c in t.ignored]

    def sources(self) -> dict[str, str]:
        return {"hosts": self.hosts.file, "vms": self.vms.file}


# --- values ---------------------------------------------------------------------------------------------------

_SPLIT = re.compile(r"[\s,|;+]+")


def _words(text: str) -> list[str]:
    return [w for w in _SPLIT.split(text.strip()) if w]


def parse_mitigations(text: str) -> frozenset[Mitigation] | None:
    """'retpoline,bhb-short' -> mitigations; 'none' -> empty; 'unenlightened' -> None (never reported)."""
    words = [w.lower() for w in _words(text)]
    if len(words) == 1 and words[0] in UNENLIGHTENED:
        return None
    if words == ["none"]:
        return frozenset()
    if words == ["both"]:
        return frozenset(Mitigation)
    if not words:
        raise ValueError("empty: give retpoline, bhb-short, both, none or unenlightened")
    out: set[Mitigation] = set()
    for w in words:
        if w in ("none", "both") or w in UNENLIGHTENED:
            raise ValueError(f"{quoted(w)} stands alone; it cannot be combined with other words")
        try:
            out.add(Mitigation(w))
        except ValueError:
            raise ValueError(f"{quoted(w)} is not one of {', '.join(m.value for m in Mitigation)}, both, none, "
                             "unenlightened") from None
    return frozenset(out)


def parse_relies_on(text: str) -> frozenset[Mitigation]:
    """What a guest relies on as read inside it: mitigation names or 'none' (never 'unenlightened')."""
    got = parse_mitigations(text)
    if got is None:
        raise ValueError("relies_on names what the guest relies on (retpoline, bhb-short, both or none); leave it "
                         "empty when that is not known")
    return got


def parse_supported(text: str) -> int:
    """MITIGATION_ENUM as request bits, from mitigation names or 'none'."""
    try:
        got = parse_mitigations(text)
    except ValueError:
        got = None
    if got is None:
        raise ValueError("supported names request bits: retpoline, bhb-short, both or none")
    return mitigations_to_bits(got)


def parse_form(text: str) -> Form | None:
    t = text.strip().lower()
    if t == "none":
        return None
    try:
        return Form(t)
    except ValueError:
        raise ValueError(f"{quoted(text)} is not one of {', '.join(f.value for f in Form)}, none") from None


def parse_bits(text: str) -> int:
    """IA32_SPEC_CTRL bit names ('RRSBA_DIS_S,BHI_DIS_S', or 'none') -> mask of controls pvmit can force."""
    words = _words(text)
    if [w.lower() for w in words] == ["none"]:
        return 0
    mask = 0
    for w in words:
        try:
            mask |= int(SpecCtrl[w.upper()])
        except KeyError:
            raise ValueError(f"IA32_SPEC_CTRL has no bit named {quoted(w)}") from None
    if mask & ~int(FORCEABLE):
        names = "+".join(str(b.name) for b in SpecCtrl if b & mask & ~int(FORCEABLE))
        raise ValueError(f"{names} is not a control pvmit can force")
    return mask


def parse_unreported(text: str) -> str:
    t = text.strip().lower()
    if t not in ("trust", "assume-worst"):
        raise ValueError(f"{quoted(text)} is not trust or assume-worst")
    return t



def mitigations_label(ms: frozenset[Mitigation] | None) -> str:
    if ms is None:
        return "unenlightened"
    return ",".join(sorted(m.value for m in ms)) or "none"


def bits_label(bits: int) -> str:
    from pvmit.derive import mitigations_from_bits
    return mitigations_label(mitigations_from_bits(bits))


# --- readers --------------------------------------------------------------------------------------------------

def _cell(value: Any, column: str, table: str) -> str | None:
    """One JSON cell as text; ValueError when its type cannot be a cell of this column."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value) if value else "none"
    facts_cell = (table, column) in (("hosts", "cpu"), ("vms", "personality"))
    if isinstance(value, dict) and facts_cell:
        return json.dumps(value)
    want = f"a string or a {'CPU facts' if column == 'cpu' else 'personality'} object" if facts_cell else \
        "a string or a list of strings"
    raise ValueError(f"must be {want}, not {type(value).__name__}")


def table_from_records(records: Sequence[Any], file: str, table: str, base_dir: Path,
                       errors: ErrorLog) -> TableSource:
    """Rows given as JSON objects -> a TableSource; rows with a cell of the wrong type are marked bad."""
    known = COLUMNS[table]
    cols: dict[str, list[str | None]] = {c: [] for c in known}
    bad = np.zeros(len(records), dtype=bool)
    ignored: dict[str, None] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            errors.add(file, table, "(row)", f"expected a JSON object, got {type(rec).__name__}", [i + 1])
            bad[i] = True
            rec = {}
        for key in rec:
            if key not in known:
                ignored[key] = None
        for c in known:
            try:
                cols[c].append(_cell(rec.get(c), c, table))
            except ValueError as e:
                errors.add(file, table, c, str(e), [i + 1])
                bad[i] = True
                cols[c].append(None)
    data = pa.table({c: pa.array(v, type=pa.string()) for c, v in cols.items()})
    return TableSource.of_table(file, table, data, np.arange(1, len(records) + 1, dtype=np.int64), bad, base_dir,
                                tuple(ignored))


def _as_strings(col: pa.ChunkedArray, name: str, where: str) -> pa.ChunkedArray:
    """A Parquet column as (dictionary-encoded) strings: lists are joined with ',', numbers become text."""
    t = col.type
    if pa.types.is_dictionary(t):
        if pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type):
            return col
        col = col.cast(t.value_type)
        t = col.type
    if pa.types.is_string(t):
        return col
    if pa.types.is_large_string(t):
        return col.cast(pa.string())
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pc.binary_join(col, ",").cast(pa.string())
    if pa.types.is_null(t):  # every cell absent: kept as a column of type null, which holds no buffers
        return col
    try:
        return col.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(f"{where}: column {quoted(name)} has type {t}, which cannot be read as text") from None


def _required(file: str, table: str, present: Iterable[str]) -> None:
    known = COLUMNS[table]
    missing = [c for c, req in known.items() if req and c not in set(present)]
    if missing:
        raise InputError(f"{file}: {table}: required column(s) {', '.join(map(repr, missing))} missing; "
                         f"columns are {', '.join(known)}")


def _finish(file: str, table: str, data: pa.Table, rows: IntArray, base_dir: Path) -> TableSource:
    """A table read whole (CSV): its known columns as strings."""
    known = COLUMNS[table]
    _required(file, table, data.column_names)
    cols = {c: _as_strings(data.column(c), c, file) for c in known if c in data.column_names}
    ignored = tuple(c for c in data.column_names if c not in known)
    return TableSource.of_table(file, table, pa.table(cols), rows, np.zeros(data.num_rows, dtype=bool), base_dir,
                                ignored)


class _ParquetColumns:
    """A Parquet table's known columns, each read, validated and turned into text when asked for; categorical
    ones dictionary-encoded (each distinct value is then checked once). Validated in full: Parquet strings are not
    checked for UTF-8 on reading (found by fuzzing). The name column, which the plan keeps, is read once."""

    def __init__(self, buf: pa.Buffer, file: str, table: str, names: list[str], leaves: set[str], rows: int) -> None:
        self.buf, self.file, self.table, self.names, self.leaves, self.rows = buf, file, table, names, leaves, rows
        self._kept: dict[str, pa.ChunkedArray] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str) -> pa.ChunkedArray | None:
        if name not in self.names:
            return None
        if name != "name":
            return self._read(name)
        with self._lock:
            if name not in self._kept:
                self._kept[name] = self._read(name)
            return self._kept[name]

    def _read(self, name: str) -> pa.ChunkedArray:
        try:
            dictionary = [name] if name != "name" and name in self.leaves else []  # lists are read as they are
            t = pq.ParquetFile(pa.BufferReader(self.buf), read_dictionary=dictionary).read(columns=[name],
                                                                                          use_threads=False)
            t.validate(full=True)
            if t.num_rows != self.rows:  # found by fuzzing: a column chunk that disagrees with the row count
                raise InputError(f"{self.file}: cannot read {self.table} table: column {quoted(name)} has "
                                 f"{t.num_rows:,} rows, the file's metadata {self.rows:,}")
            return _as_strings(t.column(0), name, self.file)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{self.file}: cannot read {self.table} table: {e}") from None


def _read_parquet(path: Path, table: str) -> TableSource:
    file = str(path)
    buf = pa.py_buffer(read_bytes(path, f"{table} table", CAPS[".parquet"]))
    meta = pq.ParquetFile(pa.BufferReader(buf)).metadata
    names = [c for c in meta.schema.to_arrow_schema().names if c in COLUMNS[table]]
    _unique_columns(names, file, table)
    _required(file, table, names)
    leaves = {meta.schema.column(i).path for i in range(meta.num_columns)}
    n = int(meta.num_rows)
    groups = sum(int(meta.row_group(i).num_rows) for i in range(meta.num_row_groups))
    if not 0 <= n <= MAX_ROWS or n != groups:  # found by fuzzing: metadata that cannot be true
        raise InputError(f"{file}: cannot read {table} table: its metadata gives {n:,} rows "
                         f"({groups:,} in its row groups; at most {MAX_ROWS:,})")
    return TableSource(file, table, n, np.arange(1, n + 1, dtype=np.int64), np.zeros(n, dtype=bool), path.parent,
                       _ParquetColumns(buf, file, table, names, leaves, n))


def read_table(path: Path, table: str, errors: ErrorLog) -> TableSource:
    """One table file (Parquet, CSV or a JSON list of rows)."""
    file = str(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return _read_parquet(path, table)
        if suffix == ".csv":
            return _read_csv(path, table, errors)
        if suffix == ".json":
            doc = read_json(path, f"{table} table", CAPS[suffix])
            if isinstance(doc, dict) and table in doc:
                doc = doc[table]
            if not isinstance(doc, list):
                raise InputError(f"{file}: expected a JSON list of {table} rows")
            return table_from_records(doc, file, table, path.parent, errors)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{file}: cannot read {table} table: {e}") from None
    except UnicodeDecodeError as e:  # found by fuzzing: a CSV header that is not UTF-8
        raise InputError(f"{file}: {table} table is not UTF-8 text: {e}") from None
    raise InputError(f"{file}: a {table} table must be .parquet, .csv or .json")


def _check_utf8(data: bytes, path: Path, table: str) -> None:
    """A CSV file must be UTF-8 throughout (pyarrow would fail deep inside on a bad header or row otherwise);
    checked in pieces, so no copy of the whole file as text is made."""
    dec = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    for offset in range(0, len(data), 1 << 22):
        chunk = view[offset:offset + (1 << 22)]
        try:
            dec.decode(chunk)
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: {table} table is not UTF-8 text: byte {offset + e.start} "
                             f"({bytes(chunk[e.start:e.start + 1])!r})") from None
    try:
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        raise InputError(f"{path}: {table} table is not UTF-8 text: it ends inside a character") from None


def _unique_columns(names: Sequence[str], file: str, table: str) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise InputError(f"{file}: {table} table: column {quoted(n)} appears more than once in the header")
        seen.add(n)


def _read_csv(path: Path, table: str, errors: ErrorLog) -> TableSource:
    file = str(path)
    raw = read_bytes(path, f"{table} table", CAPS[".csv"])
    _check_utf8(raw, path, table)
    dropped: list[int] = []

    def invalid(row: pacsv.InvalidRow) -> str:
        line = int(row.number or 0)
        dropped.append(line - 1)
        errors.add(file, table, "(row)", f"has {row.actual_columns} cells, the header has {row.expected_columns}",
                   [line - 1])
        return "skip"

    data = pacsv.read_csv(  # single-threaded: dropped rows keep numbers
        pa.BufferReader(raw), read_options=pacsv.ReadOptions(use_threads=False),
        parse_options=pacsv.ParseOptions(invalid_row_handler=invalid),
        convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(COLUMNS[table], pa.string()),
                                             strings_can_be_null=True, null_values=[""]))
    _unique_columns(data.column_names, file, table)
    rows = np.arange(1, data.num_rows + 1, dtype=np.int64)
    for d in sorted(dropped):
        rows[rows >= d] += 1
    return _finish(file, table, pa.table({c: _blank_to_null(data.column(c)) for c in data.column_names}), rows,
                   path.parent)


def _blank_to_null(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Surrounding spaces stripped and blank cells made absent, so ' icx ' and 'icx' are one value."""
    if not pa.types.is_string(col.type):
        return col
    col = pc.utf8_trim_whitespace(col)
    return pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)




def tune_allocators() -> None:
    """Memory that the planner frees is kept for its next arrays instead of being handed back to the system.

    Why: every page a process touches for the first time costs a page fault and a page of zeros, which on this VM
    came to a quarter of the time to plan a 10M-VM fleet. numpy takes large arrays from glibc, which maps each
    afresh and unmaps it when freed, and gives each thread a heap of its own; with mmap off, no trimming and one
    heap, glibc reuses what any thread freed. Arrow's buffers come from jemalloc where pyarrow has it and nobody
    chose a pool (ARROW_DEFAULT_MEMORY_POOL): reading a whole 10M-row table (as CSV and JSON inventories are read)
    spent over a second more system time with mimalloc, Arrow's default. Measured at 10M VMs from Parquet (read a
    column at a time), both together: 0.6 s less system time (0.8 s instead of 1.4 s), peak memory 4% more. These are
    per-process settings for allocations made from now on; the MALLOC_* environment variables, where set, win."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        try:
            pa.set_memory_pool(pa.jemalloc_memory_pool())
        except NotImplementedError:  # a pyarrow built without it
            pass
    if _glibc() and not any(k.startswith("MALLOC_") for k in os.environ):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt(-1, ctypes.c_int(2**31 - 1))  # M_TRIM_THRESHOLD: never give the heap's top back
            libc.mallopt(-4, ctypes.c_int(0))  # M_MMAP_MAX: no allocation gets a mapping of its own
            libc.mallopt(-8, ctypes.c_int(1))  # M_ARENA_MAX: the planner's threads share one heap
        except (OSError, AttributeError):
            pass


_tuned = False


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):  # not glibc, or not a POSIX system
        return False


def read_inventory(paths: Sequence[str | Path]) -> RawInventory:
    """An inventory from one JSON file, a directory with hosts.* and vms.*, or a hosts file and a VMs file."""
    tune_allocators()
    errors = ErrorLog()
    ps = [Path(p) for p in paths]
    if len(ps) == 2:
        return RawInventory(read_table(ps[0], "hosts", errors), read_table(ps[1], "vms", errors), errors)
    if len(ps) != 1:
        raise InputError("give one inventory (a JSON file or a directory), or a hosts table and a VMs table")
    p = ps[0]
    try:
        is_dir = stat.S_ISDIR(os.stat(p).st_mode)
    except FileNotFoundError:
        raise InputError(f"{p}: no such file or directory") from None
    except OSError as e:
        raise InputError(f"{p}: cannot read the inventory: {e.strerror or e}") from None
    if is_dir:
        found = {}
        for t in ("hosts", "vms"):
            cands = [p / f"{t}{ext}" for ext in TABLE_EXTENSIONS if (p / f"{t}{ext}").exists()]
            if len(cands) != 1:
                what = "no" if not cands else "more than one"
                raise InputError(f"{p}: {what} {t} table; expected exactly one of "
                                 + ", ".join(f"{t}{e}" for e in TABLE_EXTENSIONS))
            found[t] = read_table(cands[0], t, errors)
        return RawInventory(found["hosts"], found["vms"], errors)
    if p.suffix.lower() != ".json":
        raise InputError(f"{p}: a single-file inventory is JSON ({{\"hosts\": [...], \"vms\": [...]}}); Parquet and "
                         "CSV hold one table per file: give a directory with hosts.* and vms.*, or both files")
    return read_document(read_json(p, "inventory", CAPS[".json"]), str(p), p.parent)


def read_document(doc: Any, file: str, base_dir: Path) -> RawInventory:
    """An inventory from its JSON document already in memory (`pvmit libvirt inventory` builds one); `file`
    names it in messages and relative paths in cells are read from `base_dir`."""
    errors = ErrorLog()
    if not isinstance(doc, dict):
        raise InputError(f"{file}: expected a JSON object with 'hosts' and 'vms'")
    if "schema" in doc and doc["schema"] != SCHEMA:
        raise InputError(f"{file}: schema {quoted(str(doc['schema']))} is not {SCHEMA!r}")
    tables = {}
    for t in ("hosts", "vms"):
        rows = doc.get(t)
        if not isinstance(rows, list):
            raise InputError(f"{file}: field {t!r} must be a list of rows")
        tables[t] = table_from_records(rows, file, t, base_dir, errors)
    return RawInventory(tables["hosts"], tables["vms"], errors)


# --- writers --------------------------------------------------------------------------------------------------

def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


def write_table(data: pa.Table, path: Path) -> None:
    """A table as Parquet, CSV or JSON rows, by the file's extension."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        # no statistics for text columns, plain or dictionary-encoded: VM names are ten million distinct values (a
        # third of the write time), host names a 100,000-entry dictionary (a quarter of it); min and max of either
        # are of no use for filtering row groups
        pq.write_table(data, path, compression="zstd",
                       write_statistics=[f.name for f in data.schema if not _is_text(f.type)])
    elif suffix == ".csv":
        pacsv.write_csv(data, path)
    elif suffix == ".json":
        with open(path, "w", encoding="utf-8") as f:  # not Path.write_text: a name given by `Staging` may be
            f.write(json.dumps(data.to_pylist(), indent=1) + "\n")  # /dev/stdout
    else:
        raise InputError(f"{path}: write .parquet, .csv or .json")
