"""Hosts and VMs collapsed into equivalence classes before any pairing.

Two hosts are one class when the policy cannot tell them apart: same CPU facts and same operator settings. Two VMs
are one class when they booted with the same personality, reported the same mitigations (or never reported), use
the same form, were promised the same MITIGATION_ENUM and carry the same settings. The planner then decides each
(VM class, host class) pair once, so its cost grows with the number of distinct classes, not with VMs x hosts.

Rows are checked column by column, once per distinct value, and grouped with vectorised key arithmetic, so ten
million rows cost a few array passes and no Python object per row (`columns` holds the primitives). Cell values
that need files (host facts, personality templates) are read through a `Resolver`, each once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from pvmit.catalog.facts import CpuFacts
from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation, mitigations_to_bits
from pvmit.errors import PvmitError
from pvmit.fleet.columns import (
    SLICE,
    Codes,
    HashArray,
    Workers,
    encode,
    hash_column,
    repeated,
    smallest_int,
    strip,
)
from pvmit.fleet.inventory import (
    BoolArray,
    ErrorLog,
    IntArray,
    RawInventory,
    TableSource,
    bits_label,
    mitigations_label,
    parse_bits,
    parse_form,
    parse_mitigations,
    parse_relies_on,
    parse_supported,
    parse_unreported,
)
from pvmit.interface.bhi import DEFAULT_POLICY, BhiPolicy, shown_long_bit
from pvmit.interface.forms import Form
from pvmit.interface.policy import PartialSettings, supported_requests
from pvmit.interface.pooldesc import VERSION as POOL_VERSION
from pvmit.interface.pooldesc import describe_facts
from pvmit.userfiles import FileError, MiB, load_json, read_json
from pvmit.vmm.personality import Personality, builtin_templates, resolve

T = TypeVar("T")
Int32Array = npt.NDArray[np.int32]
HOST_FACTS_CAP = 1 * MiB
"""Largest `pvmit host --json` file a host's cpu cell may name (one is about 20 KiB)."""


@dataclass(frozen=True)
class HostClass:
    """Hosts the policy cannot tell apart: one CPU (facts) and one set of operator settings."""

    cpu: str  # what to call the CPU: a catalog model id, or 'host facts ...' for a live reading
    cpu_key: str  # identity of the facts: 'model:ID' or 'facts:SHA'
    settings: PartialSettings
    facts: CpuFacts = field(compare=False, hash=False, repr=False)

    @property
    def label(self) -> str:
        return self.cpu if not self.settings.given else f"{self.cpu} [{self.settings.label()}]"

    def to_json(self) -> dict[str, object]:
        return {"cpu": self.cpu, "cpu_key": self.cpu_key, "settings": self.settings.to_json(), "label": self.label}


@dataclass(frozen=True)
class VmClass:
    """VMs the policy cannot tell apart."""

    personality: str
    personality_key: str
    reported: frozenset[Mitigation] | None  # None: unenlightened, never reported
    form: Form | None  # None: the VMM offers no interface
    supported: int  # MITIGATION_ENUM request bits
    settings: PartialSettings
    facts: CpuFacts = field(compare=False, hash=False, repr=False)
    read_in_guest: bool = False  # `reported` is the inventory's relies_on, read inside a VM that never reported
    long_bhb: bool | None = None  # LONG_BHB_NEEDED as shown (BHI policy long-needed-bit: its cluster's answer)

    @property
    def mitigations(self) -> str:
        label = mitigations_label(self.reported)
        return f"{label} (read in the guest)" if self.read_in_guest else label

    @property
    def label(self) -> str:
        extra = f" [{self.settings.label()}]" if self.settings.given else ""
        return (f"{self.personality} / {self.mitigations} / {self.form.value if self.form else 'no interface'}"
                f" / enum {bits_label(self.supported)}{extra}")

    def to_json(self) -> dict[str, object]:
        return {"personality": self.personality, "mitigations": self.mitigations,
                "form": self.form.value if self.form else "none", "supported": bits_label(self.supported),
                "settings": self.settings.to_json(), "label": self.label, "long_bhb_needed": self.long_bhb}


def facts_digest(facts: CpuFacts) -> str:
    """What makes two CPUs' facts the same for the policy: identity and every register's known, set and inferred
    bits. Source texts are left out, so hosts read the same way collapse into one class (reasons then cite the
    sources of the first such host)."""
    regs = {k: [r.value, r.known, r.inferred] for k, r in sorted(facts.registers.items())}
    ident = [facts.vendor, facts.family, facts.model, facts.stepping]
    return hashlib.sha256(json.dumps([ident, regs]).encode()).hexdigest()[:10]


class Resolver:
    """Cell values -> CPU facts through the catalog and the files cells name (relative to the table's file)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._hosts: dict[tuple[str, Path], tuple[str, str, CpuFacts]] = {}
        self._personalities: dict[tuple[str, Path], tuple[str, str, CpuFacts] | str] = {}  # str: why not
        self._templates: dict[str, Personality] | None = None  # the built-in ones, read once

    def host_cpu(self, text: str, base: Path) -> tuple[str, str, CpuFacts]:
        """(key, label, facts) for a catalog model name, inline facts JSON, or a path to `pvmit host --json`."""
        k = (text, base)
        if k not in self._hosts:
            self._hosts[k] = self._host_cpu(text, base)
        return self._hosts[k]

    def _host_cpu(self, text: str, base: Path) -> tuple[str, str, CpuFacts]:
        t = text.strip()
        if t.startswith("{") or t.lower().endswith(".json"):
            try:
                doc = load_json(t, "the CPU facts") if t.startswith("{") \
                    else read_json(base / t, "host facts file", HOST_FACTS_CAP)
            except FileError as e:
                raise ValueError(str(e)) from None
            if isinstance(doc, dict) and "facts" in doc:
                if doc["facts"] is None:
                    raise ValueError("the `pvmit host` document has no facts (that host's CPU could not be read)")
                doc = doc["facts"]
            facts = CpuFacts.from_json(doc)
            digest = facts_digest(facts)
            near = self.catalog.by_identity(facts.vendor, facts.family, facts.model)
            like = near[0].id if len(near) == 1 else f"{facts.vendor} {facts.family:#x}/{facts.model:#x}"
            return f"facts:{digest}", f"{like} (host facts {digest[:6]})", facts
        try:
            m = self.catalog.get(t)
        except PvmitError as e:
            raise ValueError(str(e)) from None
        return f"model:{m.id}", m.id, m.facts

    def personality(self, text: str, base: Path) -> tuple[str, str, CpuFacts]:
        """(key, label, facts) for a catalog model, built-in template, template file, or a personality's JSON."""
        k = (text, base)
        if k not in self._personalities:
            name = text.strip()
            if name.lower().endswith(".toml") and not Path(name).is_absolute():
                name = str(base / name)
            if self._templates is None:
                self._templates = builtin_templates(self.catalog)
            try:
                if name.startswith("{"):
                    p = _inline_personality(name)
                    self._personalities[k] = (f"inline:{facts_digest(p.facts)}", p.name, p.facts)
                else:
                    p = resolve(self.catalog, name, self._templates)
                    self._personalities[k] = (p.origin, p.name, p.facts)
            except (PvmitError, ValueError) as e:
                self._personalities[k] = str(e)
        got = self._personalities[k]
        if isinstance(got, str):
            raise ValueError(got)
        return got


def _inline_personality(text: str) -> Personality:
    """A personality given as the JSON `Personality.to_json` writes (or bare CPU facts)."""
    try:
        doc = load_json(text, "the personality")
    except FileError as e:
        raise ValueError(str(e)) from None
    if isinstance(doc, dict) and "facts" in doc:
        return Personality.from_json(doc)
    facts = CpuFacts.from_json(doc)
    return Personality(f"{facts.vendor} {facts.family:#x}/{facts.model:#x} (facts {facts_digest(facts)[:6]})", facts,
                       "inline facts")


@dataclass
class Fleet:
    """The valid rows of an inventory, in classes. Host arrays cover valid hosts; VM arrays valid VMs."""

    host_names: list[str]
    host_rows: IntArray
    host_class: IntArray
    host_cluster: list[str | None]
    host_classes: list[HostClass]
    vm_names: pa.ChunkedArray
    vm_rows: IntArray
    vm_host: Int32Array  # index into the host arrays
    vm_class: Int32Array
    vm_classes: list[VmClass]
    errors: ErrorLog
    warnings: list[str]
    hosts_read: int
    vms_read: int
    sources: dict[str, str]
    bhi_policy: BhiPolicy = DEFAULT_POLICY
    clusters: dict[str, dict[str, Any]] = field(default_factory=dict)  # what a VMM shows the VMs booted in each

    @property
    def num_hosts(self) -> int:
        return len(self.host_names)

    @property
    def num_vms(self) -> int:
        return int(self.vm_class.size)


# --- helpers --------------------------------------------------------------------------------------------------

def _memo(parse: Callable[[str], T], prefix: bool) -> Callable[[str], tuple[T | None, str | None]]:
    """`parse` run once per distinct value: (value, None) or (None, the error message)."""
    cache: dict[str, tuple[T | None, str | None]] = {}

    def get(v: str) -> tuple[T | None, str | None]:
        if v not in cache:
            try:
                cache[v] = (parse(v), None)
            except ValueError as e:
                cache[v] = (None, f"{v!r}: {e}" if prefix else str(e))
        return cache[v]
    return get


def _flags(messages: Sequence[str | None]) -> BoolArray:
    """Per code, whether it has a message; one more entry, False, that code -1 (an absent cell) reads."""
    return np.array([m is not None for m in messages] + [False], dtype=bool)


def _log_by_code(errors: ErrorLog, src: TableSource, fld: str, messages: Sequence[str | None], codes: Codes,
                 skip: BoolArray | None) -> BoolArray | None:
    """Log, per code with a message, the rows holding it (less those in `skip`); return the rows logged (None:
    none), with array passes only."""
    flags = _flags(messages)
    if not flags.any():
        return None
    hit = flags[codes]
    if skip is not None:
        hit &= ~skip
    idx = np.flatnonzero(hit)
    if not idx.size:
        return None
    idx = idx[np.argsort(codes[idx], kind="stable")]
    cs = codes[idx]
    starts = np.flatnonzero(np.r_[True, cs[1:] != cs[:-1]])
    for s, e in zip(starts, np.r_[starts[1:], cs.size], strict=True):
        msg = messages[int(cs[s])]
        assert msg is not None
        errors.add(src.file, src.table, fld, msg, src.rows[idx[s:e]])
    return hit


def _mark(bad: BoolArray, rows: BoolArray | None) -> None:
    if rows is not None:
        bad |= rows


@dataclass
class _Column:
    """A column checked once per distinct value: parsed values and error messages by code, and each row's code
    (-1 for an absent or blank cell)."""

    name: str
    parsed: dict[int, Any]
    messages: list[str | None]
    codes: Codes

    def log(self, errors: ErrorLog, src: TableSource, bad: BoolArray, required: bool) -> None:
        """Log the rows not yet `bad` that hold a wrong value, then (if `required`) those left empty; mark them."""
        _mark(bad, _log_by_code(errors, src, self.name, self.messages, self.codes, bad))
        if required:
            missing = (self.codes < 0) & ~bad
            if missing.any():
                errors.add(src.file, src.table, self.name, "required, but empty", src.rows[missing])
                bad |= missing


def _column(src: TableSource, name: str, parse: Callable[[str], Any]) -> _Column:
    """Parse each distinct value of a VM column once; blank values count as absent (code -1)."""
    get = _memo(parse, prefix=False)
    parsed: dict[int, Any] = {}
    messages: list[str | None] = []

    def check(values: pa.Array) -> Codes:
        code = np.append(np.arange(len(values)), -1).astype(smallest_int(len(values)))
        for k, v in enumerate(values.to_pylist()):
            if not v.strip():
                code[k] = -1
                messages.append(None)
                continue
            value, msg = get(v)
            if msg is None:
                parsed[k] = value
            elif v.strip() not in msg:
                msg = f"{v!r}: {msg}"
            messages.append(msg)
        return code

    _, codes = encode(src.column(name), check)
    return _Column(name, parsed, messages, codes)


def _combine(codes: Sequence[Codes], sizes: Sequence[int]) -> tuple[IntArray, Int32Array]:
    """Rows with equal codes in every column -> one group: (the first row of each group, in row order; each row's
    group). `sizes[i]` bounds column i's codes (-1 .. sizes[i] - 2). Mixed-radix keys, built a slice of rows at a
    time; groups found with a dense table of keys where the key space is small (no sort), else with a sort."""
    n = codes[0].size if codes else 0
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int32)
    used = [(c, s) for c, s in zip(codes, sizes, strict=True) if s > 1]  # a column with no values adds nothing
    space = float(np.prod(np.array([s for _, s in used], dtype=np.float64))) if used else 1.0
    if space >= 2.0 ** 62:
        _, first, inverse = np.unique(np.stack([c for c, _ in used], axis=1), axis=0, return_index=True,
                                      return_inverse=True)
        return _renumber(first.astype(np.int64), inverse.reshape(-1).astype(np.int32))
    key: npt.NDArray[np.signedinteger[Any]] = np.zeros(n, dtype=np.int32 if space < 2.0 ** 31 else np.int64)
    for s0 in range(0, n, SLICE):
        k = key[s0:s0 + SLICE]
        for c, s in used:
            k *= s
            k += c[s0:s0 + SLICE]
            k += 1
    size = int(space)
    if space > 4 * n + (1 << 20):  # sparse: number the keys present by sorting them
        uniq, inverse = np.unique(key, return_inverse=True)
        key, size = inverse.reshape(-1).astype(np.int32), int(uniq.size)
    first_of = np.full(size, n, dtype=np.int64)
    for s0 in range(0, n, 1 << 20):
        k = key[s0:s0 + (1 << 20)]
        np.minimum.at(first_of, k, np.arange(s0, s0 + k.size, dtype=np.int64))
    present = np.flatnonzero(first_of < n)
    order = np.argsort(first_of[present], kind="stable")  # groups numbered by their first row
    group_of = np.full(size, -1, dtype=np.int32)
    group_of[present[order]] = np.arange(present.size, dtype=np.int32)
    group: Int32Array = key if key.dtype == np.int32 else np.empty(n, dtype=np.int32)  # the keys' memory, reused
    relabel(key, group_of, group)
    return first_of[present[order]], group


def relabel(a: Codes, table: npt.NDArray[np.signedinteger[Any]], out: Codes) -> None:
    """out[i] = table[a[i]], a slice of rows at a time (out may be a itself)."""
    for s0 in range(0, a.size, SLICE):
        out[s0:s0 + SLICE] = table[a[s0:s0 + SLICE]]


def _renumber(first: IntArray, group: Int32Array) -> tuple[IntArray, Int32Array]:
    """Groups renumbered in the order of their first rows."""
    order = np.argsort(first, kind="stable")
    rank = np.empty(order.size, dtype=np.int32)
    rank[order] = np.arange(order.size, dtype=np.int32)
    return first[order], rank[group]


def _rows_of(group: Int32Array, chosen: Sequence[int]) -> list[tuple[int, IntArray]]:
    """(group, its row indices) for each chosen group, in one pass over the rows."""
    if not chosen:
        return []
    flag = np.zeros(int(group.max()) + 1 if group.size else 0, dtype=bool)
    flag[list(chosen)] = True
    idx = np.flatnonzero(flag[group])
    idx = idx[np.argsort(group[idx], kind="stable")]
    gs = group[idx]
    starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
    return [(int(gs[s]), idx[s:e]) for s, e in zip(starts, np.r_[starts[1:], gs.size], strict=True)]


# --- hosts ----------------------------------------------------------------------------------------------------

@dataclass
class _Hosts:
    names: list[str]
    rows: IntArray
    klass: IntArray
    cluster: list[str | None]
    classes: list[HostClass]
    invalid: dict[str, int]  # names of hosts whose rows are all wrong -> the first of them
    cluster_code: IntArray  # per valid host: its cluster, numbered by first appearance (hosts without one share one)
    cluster_names: list[str | None]  # per cluster code
    cluster_keys: dict[int, set[str]]  # cluster code -> the CPU keys of its hosts, in code order


def _host_column(src: TableSource, name: str, get: Callable[[str], tuple[Any, str | None]],
                 empty: str | None) -> _Column:
    """A host column parsed once per distinct value; an absent or empty cell gets the message `empty` (None: no
    value and no error)."""
    values, codes = encode(src.column(name))
    parsed: dict[int, Any] = {}
    messages: list[str | None] = []
    for k, v in enumerate(values.to_pylist()):
        value, msg = get(v) if v else (None, empty)
        messages.append(msg)
        if msg is None:
            parsed[k] = value
    parsed[-1] = None
    messages.append(empty)  # code -1: an absent cell
    return _Column(name, parsed, messages, codes)


def _hosts(src: TableSource, resolver: Resolver, errors: ErrorLog) -> _Hosts:
    """Hosts checked column by column (each distinct value parsed once) with the rules a row-by-row reading gives:
    every problem of a row is reported; a name is a duplicate when an earlier valid row has it; settings are checked
    only in rows with no other problem."""
    n = src.num_rows
    rownum = np.arange(n, dtype=np.int64)
    names_arr = strip(src.column("name").combine_chunks()) if n else pa.array([], type=pa.string())
    name_values, name_codes = encode(pa.chunked_array([names_arr]))
    name_empty = np.append(np.asarray(pc.equal(name_values, "").to_numpy(zero_copy_only=False), dtype=bool),
                           True)[name_codes]
    cpu = _host_column(src, "cpu", _memo(lambda v: resolver.host_cpu(v, src.base_dir), prefix=False),
                       "required, but empty")
    bits_of = _memo(parse_bits, prefix=True)
    on = _host_column(src, "force_on", bits_of, None)
    off = _host_column(src, "force_off", bits_of, None)
    unrep = _host_column(src, "unreported", _memo(parse_unreported, prefix=True), None)
    cols = (cpu, on, off, unrep)
    cell_bad = np.zeros(n, dtype=bool)
    for c in cols:
        cell_bad |= np.array([m is not None for m in c.messages], dtype=bool)[c.codes]  # [-1]: an absent cell

    # settings, once per combination present
    sfirst, sgroup = _combine([on.codes, off.codes, unrep.codes],
                              [len(on.messages), len(off.messages), len(unrep.messages)])
    settings: list[PartialSettings | None] = []
    settings_msg: list[str | None] = []
    for r in sfirst.tolist():
        try:
            settings.append(PartialSettings(on.parsed.get(int(on.codes[r])), off.parsed.get(int(off.codes[r])),
                                            unrep.parsed.get(int(unrep.codes[r]))))
            settings_msg.append(None)
        except ValueError as e:
            settings.append(None)
            settings_msg.append(str(e))
    settings_bad = _flags(settings_msg)[:-1][sgroup] if n else np.zeros(0, dtype=bool)

    ok_other = ~cell_bad & ~settings_bad & ~src.bad
    first_ok = np.full(len(name_values), n, dtype=np.int64)
    cand = ok_other & ~name_empty
    np.minimum.at(first_ok, name_codes[cand], rownum[cand])
    dup = ~name_empty & (np.append(first_ok, n)[name_codes] < rownum)
    valid = ok_other & ~name_empty & ~dup

    # errors, per row in the order name, cpu, force_on, force_off, unreported, then the settings
    if name_empty.any():
        errors.add(src.file, src.table, "name", "required, but empty", src.rows[name_empty])
    if dup.any():
        name_list = name_values.to_pylist()
        dup_messages: list[str | None] = [None] * len(name_list)
        for k in np.unique(name_codes[dup]).tolist():
            dup_messages[k] = (f"duplicate host name {name_list[k]!r} (first at row "
                               f"{int(src.rows[first_ok[k]])})")
        _log_by_code(errors, src, "name", dup_messages, np.where(dup, name_codes, -1), None)
    for c in cols:
        _log_by_code(errors, src, c.name, c.messages[:-1], c.codes, None)
        if c.messages[-1] is not None and (c.codes < 0).any():
            errors.add(src.file, src.table, c.name, c.messages[-1], src.rows[c.codes < 0])
    settings_rows = settings_bad & ~cell_bad & ~name_empty & ~dup
    if settings_rows.any():
        _log_by_code(errors, src, "force_off", settings_msg, np.where(settings_rows, sgroup, -1), None)

    # names whose every row is wrong, for the VMs that name them
    has_valid = np.zeros(len(name_values) + 1, dtype=bool)
    has_valid[name_codes[valid]] = True
    first_any = np.full(len(name_values), n, dtype=np.int64)
    named = ~name_empty
    np.minimum.at(first_any, name_codes[named], rownum[named])
    orphans = np.flatnonzero(~has_valid[:-1] & (first_any < n))
    invalid = dict(zip(name_values.take(pa.array(orphans)).to_pylist(),
                       src.rows[first_any[orphans]].tolist(), strict=True)) if orphans.size else {}

    # the valid hosts, in classes numbered by first appearance
    idx = np.flatnonzero(valid)
    cfirst, cgroup = _combine([cpu.codes[idx], sgroup[idx]], [len(cpu.messages), max(len(sfirst), 1) + 1])
    index: dict[HostClass, int] = {}
    group_class = np.empty(cfirst.size, dtype=np.int64)
    for g, r in enumerate(idx[cfirst].tolist()):
        s = settings[int(sgroup[r])]
        assert s is not None
        key, label, facts = cpu.parsed[int(cpu.codes[r])]
        group_class[g] = index.setdefault(HostClass(label, key, s, facts), len(index))
    klass = group_class[cgroup] if idx.size else np.empty(0, dtype=np.int64)
    clusters = src.column("cluster").take(pa.array(idx))
    cvalues, ccodes = encode(clusters)
    ccodes = np.where(ccodes < 0, len(cvalues), ccodes)  # no cluster: one cluster more
    cfirst, cluster_code = _combine([ccodes], [len(cvalues) + 2])  # numbered by first appearance
    every = cvalues.to_pylist() + [None]
    classes = list(index)
    keys: dict[int, set[str]] = {c: set() for c in range(cfirst.size)}
    for pair in np.unique(cluster_code.astype(np.int64) * len(classes) + klass).tolist() if idx.size else []:
        keys[pair // len(classes)].add(classes[pair % len(classes)].cpu_key)
    return _Hosts(names=names_arr.take(pa.array(idx)).to_pylist(), rows=src.rows[idx], klass=klass,
                  cluster=clusters.to_pylist(), classes=classes, invalid=invalid,
                  cluster_code=cluster_code.astype(np.int64),
                  cluster_names=[every[int(ccodes[r])] for r in cfirst.tolist()], cluster_keys=keys)


# --- VMs ------------------------------------------------------------------------------------------------------

DUPLICATES_NAMED = 1000
"""Duplicate VM names reported one by one with the earlier row; beyond that, one message for the rest."""


def _name_hashes(col: pa.ChunkedArray) -> tuple[HashArray, BoolArray]:
    """Each name's 64-bit hash (`columns.hash_strings`) and whether it may be blank."""
    return hash_column(col)


def _hash_names(src: TableSource) -> tuple[BoolArray, HashArray]:
    """Which names may be blank, and the hash values more than one name has (the hashes are sorted for that in
    place, and made again only where some repeat). Reads the name column (in the worker that runs it)."""
    hashes, maybe_blank = _name_hashes(src.column("name"))
    return maybe_blank, repeated(hashes)


def _unique_names(src: TableSource, errors: ErrorLog, bad: BoolArray, maybe_blank: BoolArray,
                  repeats: HashArray) -> None:
    """Empty names, and every later row of a name an earlier row has. Only rows whose hash repeats are compared as
    strings, so unique names cost no string sort."""
    col = src.column("name")
    n = len(col)
    candidates = np.flatnonzero(maybe_blank)
    if candidates.size:
        cells = col.take(pa.array(candidates))
        blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(cells), ""), True)
        missing_rows = candidates[np.asarray(blank.to_numpy(zero_copy_only=False), dtype=bool)]
        missing = np.zeros(n, dtype=bool)
        missing[missing_rows] = True
        missing &= ~bad
        if missing.any():
            errors.add(src.file, src.table, "name", "required, but empty", src.rows[missing])
            bad |= missing
    if n < 2 or not repeats.size:
        return
    hashes, _ = _name_hashes(col)
    rows_np = np.flatnonzero(np.isin(hashes, repeats))  # rows sharing a hash, in row order
    del hashes
    names = col.take(pa.array(rows_np)).to_pylist()
    first_of: dict[str, int] = {}
    later: list[tuple[int, int]] = []
    for r, name in zip(rows_np.tolist(), names, strict=True):
        if name is None:  # a missing name is never a duplicate (it is reported as empty)
            continue
        f = first_of.setdefault(name, r)  # rows come in order: the first is the earliest row with the name
        if f != r and not bad[r]:
            later.append((r, f))
    for r, f in later[:DUPLICATES_NAMED]:
        errors.add(src.file, src.table, "name", f"duplicate VM name {col[r].as_py()!r} (first at row "
                                                f"{int(src.rows[f])})", [int(src.rows[r])])
    rest = np.array([r for r, _ in later[DUPLICATES_NAMED:]], dtype=np.int64)
    if rest.size:
        errors.add(src.file, src.table, "name", "duplicate VM name (an earlier row has it)", src.rows[rest])
    if later:
        bad[np.array([r for r, _ in later], dtype=np.int64)] = True


def _vm_hosts(src: TableSource, hosts: _Hosts) -> tuple[Int32Array, Codes | None, list[str | None]]:
    """Each VM's host as an index into the valid hosts (-1: blank, -2: not a valid host), through the column's
    distinct values; where some value names no valid host, the rows' codes into the values and a message for
    each value (None for the good ones)."""
    messages: list[str | None] = []

    def to_host(values: pa.Array) -> Codes:
        names = strip(values)
        blank = np.asarray(pc.equal(names, "").to_numpy(zero_copy_only=False), dtype=bool)
        found = pc.index_in(names.cast(pa.string()), value_set=pa.array(hosts.names, type=pa.string()))
        lookup = np.append(np.asarray(pc.fill_null(found, -2).to_numpy(zero_copy_only=False), dtype=np.int32), -1)
        lookup[:-1][blank] = -1
        messages.extend([None] * len(values))
        unknown = np.flatnonzero(lookup[:-1] == -2)
        for k, name in zip(unknown.tolist(), names.take(pa.array(unknown)).to_pylist(), strict=True):
            messages[k] = (f"host {name!r} is wrong in its own row (hosts row {hosts.invalid[name]})"
                           if name in hosts.invalid else f"no host named {name!r} in the inventory")
        return lookup

    col = src.column("host")
    _, vm_host = encode(col, to_host)
    return vm_host, encode(col)[1] if any(messages) else None, messages


def collapse(raw: RawInventory, resolver: Resolver, bhi_policy: BhiPolicy = DEFAULT_POLICY) -> Fleet:
    """Check every row and put the valid ones into classes; errors go to `raw.errors`. MITIGATION_ENUM and
    LONG_BHB_NEEDED of a VM that does not give its own are its host's cluster's under `bhi_policy`.

    The work that needs no other column (hashing the names, coding each column and checking its distinct values)
    runs side by side on this process's CPUs; the checks are then applied in a fixed order, each to the rows no
    earlier check refused, so a row is reported for its first problem: name, host, personality, mitigations, form,
    supported, force_on, force_off, unreported, relies_on, then what its class combines."""
    errors = raw.errors
    src = raw.vms
    with Workers() as workers:
        hashing = workers.submit(_hash_names, src)
        hosts = _hosts(raw.hosts, resolver, errors)
        vm_host, host_codes, host_messages = _vm_hosts(src, hosts)
        cols = [_column(src, "personality", lambda v: resolver.personality(v, src.base_dir)),
                _column(src, "mitigations", parse_mitigations), _column(src, "form", parse_form),
                _column(src, "supported", parse_supported), _column(src, "force_on", parse_bits),
                _column(src, "force_off", parse_bits), _column(src, "unreported", parse_unreported),
                _column(src, "relies_on", parse_relies_on)]
        maybe_blank, repeats = hashing.result()
    facts_of = {c.cpu_key: c.facts for c in hosts.classes}
    cluster_supported = {c: supported_requests((facts_of[k] for k in sorted(keys)), bhi_policy)
                         for c, keys in hosts.cluster_keys.items()}
    cluster_long = {c: shown_long_bit(bhi_policy, (facts_of[k] for k in sorted(keys)))
                    for c, keys in hosts.cluster_keys.items()}
    described = {c: cluster_description([facts_of[k] for k in sorted(keys)])
                 for c, keys in hosts.cluster_keys.items()}
    cluster_doc = {str(hosts.cluster_names[c]) if hosts.cluster_names[c] is not None else "(no cluster)": {
        "mitigation_enum": cluster_supported[c], "long_bhb_needed": cluster_long[c], **described[c]}
        for c in hosts.cluster_keys}

    bad = src.bad.copy()
    _unique_names(src, errors, bad, maybe_blank, repeats)
    del maybe_blank
    if host_codes is not None:
        _mark(bad, _log_by_code(errors, src, "host", host_messages, host_codes, bad))
        del host_codes
    missing = (vm_host == -1) & ~bad
    if missing.any():
        errors.add(src.file, src.table, "host", "required, but empty", src.rows[missing])
        bad |= missing
    for column, required in zip(cols, (True, True, True, False, False, False, False, False), strict=True):
        column.log(errors, src, bad, required)
    pers, mits, forms, sups, ons, offs, uns, rels = cols

    ok = None if not bad.any() else np.flatnonzero(~bad)  # None: every row

    def rows_ok(a: Codes) -> Codes:  # the valid rows of a column: the column itself when every row is valid
        return a if ok is None else a[ok]

    host_ok = rows_ok(vm_host)
    ncl = len(hosts.cluster_names)
    host_cluster = hosts.cluster_code.astype(smallest_int(ncl))
    cl = np.where(rows_ok(sups.codes) < 0, host_cluster[host_ok], -1)
    lc = host_cluster[host_ok] if bhi_policy.shows_long_bit else np.full(host_ok.size, -1, dtype=np.int8)
    codes = [rows_ok(c.codes) for c in cols] + [cl, lc]
    first, group = _combine(codes, [len(c.messages) + 1 for c in cols] + [ncl + 1, ncl + 1])
    index: dict[VmClass, int] = {}
    group_class = np.full(first.size, -1, dtype=np.int32)
    problems: dict[int, tuple[str, str]] = {}
    for g, r in enumerate(first.tolist()):
        p, m, f, s, on, off, un, rel, c, lcode = (int(col[r]) for col in codes)
        pkey, plabel, pfacts = pers.parsed[p]
        reported, form = mits.parsed[m], forms.parsed[f]
        problem: tuple[str, str] | None = None
        if form is None:
            supported = 0
            if reported is not None:
                problem = ("form", f"form none: a VM without the interface cannot have reported "
                                   f"{mitigations_label(reported)} (use mitigations 'unenlightened')")
            elif sups.parsed.get(s):
                problem = ("supported", "form none: a VM without the interface is promised nothing")
        elif s >= 0:
            supported = sups.parsed[s]
            extra = mitigations_to_bits(reported or frozenset()) & ~supported
            if extra:
                problem = ("mitigations", f"reports {bits_label(extra)}, which its MITIGATION_ENUM (supported: "
                                          f"{bits_label(supported)}) never offered")
        else:
            supported = cluster_supported.get(c, 0) | mitigations_to_bits(reported or frozenset())
        read_in_guest = rel >= 0
        if problem is None and read_in_guest:
            if reported is not None:
                problem = ("relies_on", f"relies_on is for a VM that never reported; this one reported "
                                        f"{mitigations_label(reported)} through the interface")
            else:
                reported = rels.parsed[rel]  # decided as a report: what the kernel relies on is known
        settings = None
        if problem is None:
            try:
                settings = PartialSettings(ons.parsed.get(on), offs.parsed.get(off), uns.parsed.get(un))
            except ValueError as e:
                problem = ("force_off", str(e))
        if problem is not None or settings is None:
            problems[g] = problem or ("(row)", "invalid")
            continue
        vc = VmClass(plabel, pkey, reported, form, supported, settings, pfacts, read_in_guest,
                     cluster_long.get(lcode) if form is not None else None)
        group_class[g] = index.setdefault(vc, len(index))
    for g, rows_g in _rows_of(group, list(problems)):
        fld, msg = problems[g]
        rows = rows_g if ok is None else ok[rows_g]
        errors.add(src.file, src.table, fld, msg, src.rows[rows])
        bad[rows] = True
    vm_class = group  # each row's class, in the memory of its group
    relabel(group, group_class, vm_class)
    if problems:
        keep = vm_class >= 0
        ok, vm_class = (np.flatnonzero(keep) if ok is None else ok[keep]), vm_class[keep]
    names = src.column("name") if ok is None else src.column("name").take(pa.array(ok))
    return Fleet(
        host_names=hosts.names, host_rows=hosts.rows, host_class=hosts.klass, host_cluster=hosts.cluster,
        host_classes=hosts.classes, vm_names=names, vm_rows=src.rows if ok is None else src.rows[ok],
        vm_host=vm_host if ok is None else vm_host[ok], vm_class=vm_class, vm_classes=list(index),
        errors=errors, warnings=raw.warnings, hosts_read=raw.hosts.num_rows, vms_read=src.num_rows,
        sources=raw.sources(), bhi_policy=bhi_policy, clusters=cluster_doc)


def cluster_description(hosts: list[CpuFacts]) -> dict[str, Any]:
    """The pool description a VMM fills for VMs booted in a cluster of `hosts` (docs/interface.md section 10), or
    why it cannot (more implementations than a description holds)."""
    try:
        entries = describe_facts(hosts)
    except ValueError as e:
        return {"pool_description": None, "pool_description_problem": str(e)}
    return {"pool_description": {"pool_info": len(entries) | POOL_VERSION << 8,
                                 "entries": [e.to_json() for e in entries]}}
