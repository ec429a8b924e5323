"""Hosts and VMs collapsed into equivalence classes before any pairing.

Two hosts are one class when the policy cannot tell them apart: same CPU facts and same operator settings. Two VMs
are one class when they booted with the same personality, reported the same mitigations (or never reported), use
the same form, were promised the same MITIGATION_ENUM and carry the same settings. The planner then decides each
(VM class, host class) pair once, so its cost grows with the number of distinct classes, not with VMs x hosts.

VM rows are checked column by column, once per distinct value, and grouped with vectorised key arithmetic, so a
million rows cost a few array passes. Cell values that need files (host facts, personality templates) are read
through a `Resolver`, each once.
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
from pvmit.vmm.personality import Personality, resolve

T = TypeVar("T")
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
            try:
                if name.startswith("{"):
                    p = _inline_personality(name)
                    self._personalities[k] = (f"inline:{facts_digest(p.facts)}", p.name, p.facts)
                else:
                    p = resolve(self.catalog, name)
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
    vm_host: IntArray  # index into the host arrays
    vm_class: IntArray
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

Codes = npt.NDArray[np.integer[Any]]
"""Row codes into a column's distinct values (int32 from `encode`; -1 for an absent cell)."""


def encode(col: pa.ChunkedArray) -> tuple[list[str | None], Codes]:
    """The distinct values of a column and each row's index into them (-1 for an absent cell)."""
    if not pa.types.is_dictionary(col.type):
        col = col.dictionary_encode()
    col = col.unify_dictionaries()
    chunks = [c for c in col.chunks if len(c)]
    if not chunks:
        return [], np.empty(0, dtype=np.int64)
    values: list[str | None] = chunks[0].dictionary.to_pylist()
    codes = np.empty(sum(len(c) for c in chunks), dtype=np.int32)  # int32: half the memory of int64 at 10M rows
    pos = 0
    for c in chunks:
        idx = c.indices if not c.null_count else pc.fill_null(c.indices, -1)
        codes[pos:pos + len(c)] = idx.to_numpy(zero_copy_only=False)
        pos += len(c)
    return values, codes


def _log_by_code(errors: ErrorLog, src: TableSource, fld: str, messages: Sequence[str | None], codes: Codes,
                 bad: BoolArray) -> None:
    """Log, per distinct value with a message, the rows holding it (and mark them bad), with array passes only."""
    is_bad = np.array([m is not None for m in messages] + [False], dtype=bool)  # [-1] -> the appended False
    hit = is_bad[codes] & ~bad
    if not hit.any():
        return
    idx = np.nonzero(hit)[0]
    order = np.argsort(codes[idx], kind="stable")
    idx = idx[order]
    cs = codes[idx]
    starts = np.flatnonzero(np.r_[True, cs[1:] != cs[:-1]])
    for s, e in zip(starts, np.r_[starts[1:], cs.size], strict=True):
        msg = messages[int(cs[s])]
        assert msg is not None
        errors.add(src.file, src.table, fld, msg, src.rows[idx[s:e]])
    bad |= hit


def _column(src: TableSource, name: str, parse: Callable[[str], T], errors: ErrorLog, bad: BoolArray,
            required: bool) -> tuple[dict[int, T], Codes]:
    """A column checked once per distinct value: {code: parsed value} for the good values, and each row's code
    (-1 for an absent cell). Rows with a bad value, or absent where the column is required, are logged and marked."""
    values, codes = encode(src.data.column(name))
    get = _memo(parse, prefix=False)
    parsed: dict[int, T] = {}
    messages: list[str | None] = []
    blank = np.zeros(len(values) + 1, dtype=bool)
    for k, v in enumerate(values):
        if v is None or not v.strip():
            blank[k] = True
            messages.append(None)
            continue
        value, msg = get(v)
        if msg is None:
            parsed[k] = value  # type: ignore[assignment]  # parse succeeded: a T, which may itself be None
        elif v.strip() not in msg:
            msg = f"{v!r}: {msg}"
        messages.append(msg)
    if blank.any():
        codes = np.where(blank[codes], -1, codes)
    _log_by_code(errors, src, name, messages, codes, bad)
    if required:
        missing = (codes < 0) & ~bad
        if missing.any():
            errors.add(src.file, src.table, name, "required, but empty", src.rows[missing])
            bad |= missing
    return parsed, codes


# --- hosts ----------------------------------------------------------------------------------------------------

@dataclass
class _Hosts:
    names: list[str]
    rows: list[int]
    klass: list[int]
    cluster: list[str | None]
    classes: list[HostClass]
    invalid: dict[str, int]  # host names whose rows are wrong -> row


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


def _hosts(src: TableSource, resolver: Resolver, errors: ErrorLog) -> _Hosts:
    """Hosts row by row (thousands, not millions); each distinct cell value is parsed once."""
    d = src.data.to_pydict()
    out = _Hosts([], [], [], [], [], {})
    index: dict[HostClass, int] = {}
    seen: dict[str, int] = {}
    cpu_of = _memo(lambda v: resolver.host_cpu(v, src.base_dir), prefix=False)
    bits_of = _memo(parse_bits, prefix=True)
    unreported_of = _memo(parse_unreported, prefix=True)

    for i in range(src.num_rows):
        row = int(src.rows[i])
        problems: list[tuple[str, str | None]] = []
        name = (d["name"][i] or "").strip()
        if not name:
            problems.append(("name", "required, but empty"))
        elif name in seen:
            problems.append(("name", f"duplicate host name {name!r} (first at row {seen[name]})"))
        cpu, cpu_err = cpu_of(d["cpu"][i]) if d["cpu"][i] else (None, "required, but empty")
        on, on_err = bits_of(d["force_on"][i]) if d["force_on"][i] else (None, None)
        off, off_err = bits_of(d["force_off"][i]) if d["force_off"][i] else (None, None)
        unrep, unrep_err = unreported_of(d["unreported"][i]) if d["unreported"][i] else (None, None)
        problems += [("cpu", cpu_err), ("force_on", on_err), ("force_off", off_err), ("unreported", unrep_err)]
        problems = [(f, m) for f, m in problems if m]
        settings = None
        if not problems:
            try:
                settings = PartialSettings(on, off, unrep)
            except ValueError as e:
                problems.append(("force_off", str(e)))
        if problems or src.bad[i] or settings is None or cpu is None:
            for fld, msg in problems:
                errors.add(src.file, src.table, fld, str(msg), [row])
            if name and name not in seen:
                out.invalid.setdefault(name, row)
            continue
        seen[name] = row
        key, label, facts = cpu
        hc = HostClass(label, key, settings, facts)
        out.names.append(name)
        out.rows.append(row)
        out.klass.append(index.setdefault(hc, len(index)))
        out.cluster.append(d["cluster"][i])
    out.classes = list(index)
    return out


# --- VMs ------------------------------------------------------------------------------------------------------

DUPLICATES_NAMED = 1000
"""Duplicate VM names reported one by one with the earlier row; beyond that, one message for the rest."""


_HASH_P = np.uint64(0x9E3779B97F4A7C15)
_HASH_LEN = np.uint64(0xC2B2AE3D27D4EB4F)
_HASH_POWERS = 4096
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True


def _powers() -> npt.NDArray[np.uint64]:
    pw = np.empty(_HASH_POWERS, dtype=np.uint64)
    pw[0] = 1
    with np.errstate(over="ignore"):
        for i in range(1, _HASH_POWERS):
            pw[i] = pw[i - 1] * _HASH_P
    return pw


def _name_hashes(col: pa.ChunkedArray, step: int = 1 << 20) -> tuple[npt.NDArray[np.uint64], BoolArray]:
    """A 64-bit hash of every string (a polynomial over its UTF-8 bytes, from Arrow's buffers, a million strings at a
    time) and whether it may be blank (null, empty, or starting with whitespace). Equal strings hash equal; unequal
    ones rarely do, and callers compare the strings of equal hashes."""
    pw = _powers()
    n = len(col)
    out = np.empty(n, dtype=np.uint64)
    maybe_blank = np.zeros(n, dtype=bool)
    pos = 0
    for chunk in col.chunks:
        if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
            chunk = chunk.cast(pa.string())
        for s in range(0, len(chunk), step):
            arr = chunk.slice(s, step)
            m = len(arr)
            otype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
            bufs = arr.buffers()
            offs = np.frombuffer(bufs[1], dtype=otype, count=m + 1,
                                 offset=arr.offset * np.dtype(otype).itemsize).astype(np.int64)
            data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(1, np.uint8)
            a, b = int(offs[0]), int(offs[-1])
            lens = np.diff(offs)
            starts = offs[:-1] - a
            nz = lens > 0
            sums = np.zeros(m, dtype=np.uint64)
            if b > a:
                rel = np.arange(b - a, dtype=np.int64) - np.repeat(starts, lens)
                np.minimum(rel, _HASH_POWERS - 1, out=rel)
                with np.errstate(over="ignore"):
                    prod = data[a:b].astype(np.uint64) * pw[rel]
                sums[nz] = np.add.reduceat(prod, starts[nz])
            with np.errstate(over="ignore"):
                out[pos:pos + m] = sums ^ (lens.astype(np.uint64) * _HASH_LEN)
            first = np.zeros(m, dtype=bool)
            first[nz] = _WHITESPACE[data[offs[:-1][nz]]]
            blank = ~nz | first
            if arr.null_count:
                blank |= np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            maybe_blank[pos:pos + m] = blank
            pos += m
    return out, maybe_blank


def _unique_names(src: TableSource, errors: ErrorLog, bad: BoolArray) -> None:
    """Empty names, and every later row of a name an earlier row has. Names are hashed (`_name_hashes`) and the
    hashes sorted; only rows whose hash repeats are compared as strings, so unique names cost no string sort."""
    col = src.data.column("name")
    n = len(col)
    hashes, maybe_blank = _name_hashes(col)
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
    if n < 2:
        return
    ordered = np.sort(hashes)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if not repeated.size:
        return
    rows_np = np.flatnonzero(np.isin(hashes, np.unique(repeated)))  # rows sharing a hash, in row order
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


def _vm_hosts(src: TableSource, hosts: _Hosts, errors: ErrorLog, bad: BoolArray) -> IntArray:
    """Each VM's host as an index into the valid hosts, through the column's distinct values (-1: none)."""
    values, codes = encode(src.data.column("host"))
    index = {name: i for i, name in enumerate(hosts.names)}
    lookup = np.full(len(values) + 1, -1, dtype=np.int64)  # [-1] -> -1 for absent cells
    messages: list[str | None] = []
    for k, v in enumerate(values):
        name = (v or "").strip()
        if not name:
            messages.append(None)
        elif name in index:
            lookup[k] = index[name]
            messages.append(None)
        elif name in hosts.invalid:
            messages.append(f"host {name!r} is wrong in its own row (hosts row {hosts.invalid[name]})")
        else:
            messages.append(f"no host named {name!r} in the inventory")
    host: IntArray = lookup[codes]
    _log_by_code(errors, src, "host", messages, codes, bad)
    blank = np.array([not (v or "").strip() for v in values] + [True], dtype=bool)
    missing = blank[codes] & ~bad
    if missing.any():
        errors.add(src.file, src.table, "host", "required, but empty", src.rows[missing])
        bad |= missing
    return host


def _combine(codes: Sequence[Codes]) -> tuple[IntArray, IntArray]:
    """Rows with equal codes in every column -> one group: (index of the first row of each group, group of each
    row). Mixed-radix keys; a dense table of keys where the key space is small (no sort), else a sort."""
    n = codes[0].size if codes else 0
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    sizes = [int(c.max()) + 2 for c in codes]
    space = float(np.prod(np.array(sizes, dtype=np.float64)))
    if space >= 2.0 ** 62:
        _, first, inverse = np.unique(np.stack(codes, axis=1), axis=0, return_index=True, return_inverse=True)
        return first.astype(np.int64), inverse.reshape(-1).astype(np.int64)
    key = np.zeros(n, dtype=np.int64)
    for c, s in zip(codes, sizes, strict=True):
        key = key * s + (c + 1)
    if space > 4 * n + 1_000_000:
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        return first.astype(np.int64), inverse.reshape(-1).astype(np.int64)
    first_of = np.full(int(space), n, dtype=np.int64)
    np.minimum.at(first_of, key, np.arange(n, dtype=np.int64))
    present = np.flatnonzero(first_of < n)
    group_of = np.full(int(space), -1, dtype=np.int64)
    order = np.argsort(first_of[present], kind="stable")  # groups numbered by their first row
    group_of[present[order]] = np.arange(present.size, dtype=np.int64)
    return first_of[present[order]], group_of[key]


def collapse(raw: RawInventory, resolver: Resolver, bhi_policy: BhiPolicy = DEFAULT_POLICY) -> Fleet:
    """Check every row and put the valid ones into classes; errors go to `raw.errors`. MITIGATION_ENUM and
    LONG_BHB_NEEDED of a VM that does not give its own are its host's cluster's under `bhi_policy`."""
    errors = raw.errors
    hosts = _hosts(raw.hosts, resolver, errors)
    host_facts = {hosts.classes[k].cpu_key: hosts.classes[k].facts for k in hosts.klass}
    clusters: dict[str | None, int] = {}
    cluster_code = np.array([clusters.setdefault(c, len(clusters)) for c in hosts.cluster], dtype=np.int64)
    cluster_keys: dict[int, set[str]] = {}
    for k, code in zip(hosts.klass, cluster_code, strict=True):
        cluster_keys.setdefault(int(code), set()).add(hosts.classes[k].cpu_key)
    cluster_supported = {c: supported_requests((host_facts[k] for k in sorted(keys)), bhi_policy)
                         for c, keys in cluster_keys.items()}
    cluster_long = {c: shown_long_bit(bhi_policy, (host_facts[k] for k in sorted(keys)))
                    for c, keys in cluster_keys.items()}
    described = {c: cluster_description([host_facts[k] for k in sorted(keys)]) for c, keys in cluster_keys.items()}
    cluster_names = {code: name for name, code in clusters.items()}
    cluster_doc = {str(cluster_names[c]) if cluster_names[c] is not None else "(no cluster)": {
        "mitigation_enum": cluster_supported[c], "long_bhb_needed": cluster_long[c], **described[c]}
        for c in cluster_keys}

    src = raw.vms
    bad = src.bad.copy()
    _unique_names(src, errors, bad)
    vm_host = _vm_hosts(src, hosts, errors, bad)
    pers, pers_c = _column(src, "personality", lambda v: resolver.personality(v, src.base_dir), errors, bad, True)
    mits, mits_c = _column(src, "mitigations", parse_mitigations, errors, bad, True)
    forms, form_c = _column(src, "form", parse_form, errors, bad, True)
    sups, sup_c = _column(src, "supported", parse_supported, errors, bad, False)
    ons, on_c = _column(src, "force_on", parse_bits, errors, bad, False)
    offs, off_c = _column(src, "force_off", parse_bits, errors, bad, False)
    uns, un_c = _column(src, "unreported", parse_unreported, errors, bad, False)
    rels, rel_c = _column(src, "relies_on", parse_relies_on, errors, bad, False)

    all_ok = not bad.any()
    ok = np.arange(src.num_rows, dtype=np.int64) if all_ok else np.flatnonzero(~bad)

    def rows_ok(a: Codes) -> Codes:  # the valid rows of a column: the column itself when every row is valid
        return a if all_ok else a[ok]

    host_ok = rows_ok(vm_host)
    cl = np.where(rows_ok(sup_c) < 0, cluster_code[host_ok], -1).astype(np.int32)
    lc = cluster_code[host_ok] if bhi_policy.shows_long_bit else np.zeros(host_ok.size, dtype=np.int64)
    cols = [rows_ok(c) for c in (pers_c, mits_c, form_c, sup_c, on_c, off_c, un_c, rel_c)] + [cl, lc]
    first, group = _combine(cols)
    index: dict[VmClass, int] = {}
    group_class = np.full(first.size, -1, dtype=np.int64)
    for g, r in enumerate(first):
        p, m, f, s, on, off, un, rel, c, lcode = (int(col[r]) for col in cols)
        pkey, plabel, pfacts = pers[p]
        reported, form = mits[m], forms[f]
        problem: tuple[str, str] | None = None
        if form is None:
            supported = 0
            if reported is not None:
                problem = ("form", f"form none: a VM without the interface cannot have reported "
                                   f"{mitigations_label(reported)} (use mitigations 'unenlightened')")
            elif sups.get(s):
                problem = ("supported", "form none: a VM without the interface is promised nothing")
        elif s >= 0:
            supported = sups[s]
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
                reported = rels[rel]  # decided as a report: what the kernel relies on is known
        settings = None
        if problem is None:
            try:
                settings = PartialSettings(ons.get(on), offs.get(off), uns.get(un))
            except ValueError as e:
                problem = ("force_off", str(e))
        if problem is not None or settings is None:
            rows_g = ok[group == g]
            fld, msg = problem or ("(row)", "invalid")
            errors.add(src.file, src.table, fld, msg, src.rows[rows_g])
            bad[rows_g] = True
            continue
        vc = VmClass(plabel, pkey, reported, form, supported, settings, pfacts, read_in_guest,
                     cluster_long.get(lcode) if form is not None else None)
        group_class[g] = index.setdefault(vc, len(index))
    vm_class_ok = group_class[group] if group.size else np.empty(0, dtype=np.int64)
    keep = vm_class_ok >= 0
    if not keep.all():
        ok, vm_class_ok = ok[keep], vm_class_ok[keep]
    names = src.data.column("name").take(pa.array(ok)) if ok.size != src.num_rows else src.data.column("name")
    return Fleet(
        host_names=hosts.names, host_rows=np.array(hosts.rows, dtype=np.int64),
        host_class=np.array(hosts.klass, dtype=np.int64), host_cluster=hosts.cluster, host_classes=hosts.classes,
        vm_names=names, vm_rows=src.rows if ok.size == src.num_rows else src.rows[ok],
        vm_host=vm_host if ok.size == src.num_rows else vm_host[ok], vm_class=vm_class_ok, vm_classes=list(index),
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
