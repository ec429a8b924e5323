"""`pvmit bench bhi`: the four BHI policies side by side, what can be measured here and what is modelled.

Measured, in one run:
  native    the short (5 x 5) and long (12 x 7) BHB-clearing sequences (guest/bhb.s, Linux's clear_bhb_loop shape)
            assembled with Keystone into an executable page and called directly: a stub calls the sequence n times
            per foreign call, timed with perf_counter_ns; ns per call;
  guest     the same sequences inside the test guest (guest/bhi_workload.s) on /dev/kvm: the VMM timestamps the
            guest's markers around n calls, less a run of n entries with no sequence; microseconds per call, and the
            guest's TSC ticks;
  workload  per policy, a guest that enters its kernel n times (the loop the policy makes it run, and optionally two
            IA32_SPEC_CTRL writes per entry, as with Linux's spectre_v2=ibrs) in pvmit's VMM on a Sapphire Rapids
            stand-in: userspace exits and the VMM's IA32_SPEC_CTRL writes per 1,000 entries, with the forced bits held
            by interception (pvmit today, measured) and by the per-vCPU hardware mask (no exit; modelled, since no KVM
            offers it: the VMM stops intercepting and counts what it would write).
Modelled (no timing): per policy, over the catalog's pools, which guests are exposed, where BHI_DIS_S is forced, who
runs the long loop, and which moves are refused (`pvmit.interface.bhi_compare`, with the real migration check).
Figures only: nothing here passes or fails on a time.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pvmit.asm import assemble, package_source
from pvmit.catalog.loader import Catalog
from pvmit.guest import program, source_of
from pvmit.interface.bhi import BhiPolicy, long_bhb_needed, shown_long_bit
from pvmit.interface.bhi_compare import PROPOSAL, compare, guest_kinds, scenario_pools
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.policy import OperatorSettings, supported_requests
from pvmit.interface.spec_ctrl import SpecCtrlBackend
from pvmit.kvm.system import Kvm
from pvmit.linux.bhb import LONG, SHORT, bhb_choice
from pvmit.pool.rule import personality_for_pool, pool_bits
from pvmit.vmm.personality import Personality
from pvmit.vmm.vmm import GuestStopped, Host, Vmm

Progress = Callable[[str], None]
LOOPS = {"short": SHORT, "long": LONG}


class NativeLoops:
    """The two sequences, callable on this CPU: clear_bhb (guest/bhb.s) behind a stub that calls it n times."""

    def __init__(self) -> None:
        text = package_source("pvmit.host", "bhb_stub.s") + "\n" + source_of("bhb")
        code = assemble(text, name="bhb_stub.s + bhb.s")
        self._mem = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._mem.write(code)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._mem))
        proto = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32)
        self._fn: Callable[[int, int, int], None] = proto(addr)

    def ns_per_call(self, counts: tuple[int, int], calls: int) -> float:
        if calls < 1 or min(counts) < 1:
            raise ValueError("at least one call, and loop counts of at least 1")
        start = time.perf_counter_ns()
        self._fn(calls, *counts)
        return (time.perf_counter_ns() - start) / calls


def native(calls: int, repeats: int, progress: Progress) -> dict[str, Any]:
    loops = NativeLoops()
    samples: dict[str, list[float]] = {k: [] for k in LOOPS}
    for r in range(repeats):
        for name, counts in LOOPS.items():  # interleaved, so that drift hits both alike
            samples[name].append(loops.ns_per_call(counts, calls))
        if r % 10 == 0 or r == repeats - 1:
            progress(f"native repeat {r + 1}/{repeats}: short {samples['short'][-1]:.1f} ns, "
                     f"long {samples['long'][-1]:.1f} ns per call")
    best = {k: min(v) for k, v in samples.items()}  # the run least disturbed by the rest of the machine
    return {"calls": calls, "repeats": repeats, "ns_per_call": {k: round(v, 2) for k, v in best.items()},
            "median_ns_per_call": {k: round(statistics.median(v), 2) for k, v in samples.items()},
            "all_ns_per_call": {k: [round(x, 2) for x in v] for k, v in samples.items()},
            "long_over_short": round(best["long"] / best["short"], 3)}


@dataclass
class Marks:
    """What the VMM had counted when the guest printed its S and E markers."""

    ns: list[int]
    exits: list[int]
    spec_exits: list[int]
    spec_writes: list[int]
    tsc: int = 0


def _run(kvm: Kvm, personality: Personality, host: Host, config: InterfaceConfig, settings: OperatorSettings,
         backend: SpecCtrlBackend, entries: int, counts: tuple[int, int] | None, spec_writes: bool,
         report: int | None) -> Marks:
    marks = Marks([], [], [], [])
    box: list[Vmm] = []

    def on_line(line: str) -> None:
        if line in ("S", "E"):
            v = box[0]
            marks.ns.append(time.perf_counter_ns())
            marks.exits.append(v.counts.total)
            marks.spec_exits.append(v.counts.spec_ctrl)
            marks.spec_writes.append(v.spec_ctrl_writes)
        elif line.startswith("guest: tsc "):
            marks.tsc = int(line.split()[-1], 16)

    vmm = Vmm(kvm, personality, host, config, settings, on_line=on_line, spec_ctrl_backend=backend)
    box.append(vmm)
    try:
        guest = program("bhi_workload")
        outer, inner = counts or (0, 0)
        vmm.load(guest.code, guest.load_address, (entries, outer, inner, int(spec_writes),
                                                   config.ctrl_msr if report is not None else 0, report or 0))
        stop = vmm.run(max_exits=10 * entries + 10_000, timeout=600)
        if stop != "hlt" or len(marks.ns) != 2:
            raise GuestStopped(f"the workload guest did not finish ({stop}, {len(marks.ns)} markers)")
    finally:
        vmm.close()
    return marks


def in_guest(kvm: Kvm, personality: Personality, host: Host, calls: int, repeats: int,
             progress: Progress) -> dict[str, Any]:
    """Per-call cost of each sequence inside the test guest: (time with the sequence - time without) / calls."""
    config = InterfaceConfig(Form.NEUTRAL, 0)
    settings = OperatorSettings(unreported="trust")
    runs: dict[str, list[Marks]] = {"none": [], "short": [], "long": []}
    for r in range(repeats):
        for name in runs:
            runs[name].append(_run(kvm, personality, host, config, settings, SpecCtrlBackend.INTERCEPT, calls,
                                   LOOPS.get(name), False, None))
        progress(f"guest repeat {r + 1}/{repeats}: " + ", ".join(
            f"{k} {(m[-1].ns[1] - m[-1].ns[0]) / calls / 1000:.1f} us" for k, m in runs.items()) + " per entry")
    wall = {k: statistics.median((m.ns[1] - m.ns[0]) / calls for m in v) for k, v in runs.items()}
    tsc = {k: statistics.median(m.tsc / calls for m in v) for k, v in runs.items()}
    return {"calls": calls, "repeats": repeats,
            "us_per_call": {k: round((wall[k] - wall["none"]) / 1000, 2) for k in LOOPS},
            "tsc_ticks_per_call": {k: round(tsc[k] - tsc["none"], 1) for k in LOOPS},
            "us_per_entry_without_a_loop": round(wall["none"] / 1000, 2),
            "long_over_short": round((wall["long"] - wall["none"]) / max(1.0, wall["short"] - wall["none"]), 3)}


def workload(kvm: Kvm, catalog: Catalog, real: Host, entries: int, repeats: int,
             progress: Progress) -> list[dict[str, Any]]:
    """Per policy and backend, with 0 and 2 IA32_SPEC_CTRL writes per entry: exits and writes per 1,000 entries,
    for a guest that follows the policy, booted in the catalog's mixed pool, running on a Sapphire Rapids stand-in."""
    from pvmit.vmm.hosts import stand_in

    boot, _ = scenario_pools(catalog)["mixed"]
    facts = [m.facts for m in boot]
    shown = personality_for_pool(boot[0].facts, pool_bits([(m.id, m.facts) for m in boot]))
    personality = Personality(f"{boot[0].id} in the mixed pool", shown, "pvmit bench bhi")
    longs = [m for m in boot if long_bhb_needed([m.facts]) and m.facts.fact("cpuid_7_2_edx", "BHI_CTRL").value]
    long_host = next((m for m in longs if m.id == "sapphirerapids"), longs[0])
    host = stand_in(catalog, long_host.id, real)
    follower = next(k for k in guest_kinds() if k.follows_policy and k.tolerates_bhi_dis_s)
    rows = []
    for policy in BhiPolicy:
        proposals = frozenset({PROPOSAL[policy]}) if policy in PROPOSAL else frozenset()
        long_bit = shown_long_bit(policy, facts)
        choice = bhb_choice(shown, follower.kernel, proposals=proposals,
                            spectre_bhi_long=policy is BhiPolicy.CMDLINE_LONG, long_bit=bool(long_bit))
        config = InterfaceConfig(Form.NEUTRAL, supported_requests(facts, policy), bhb_long=long_bit)
        settings = OperatorSettings(bhi_policy=policy)  # unreported: assumed from its personality
        row: dict[str, Any] = {"policy": policy.value, "loop": choice.loop, "host": long_host.id, "runs": {}}
        for backend in SpecCtrlBackend:
            for writes in (False, True):
                ms = [_run(kvm, personality, host, config, settings, backend, entries, choice.counts, writes, None)
                      for _ in range(repeats)]
                per_k = 1000 / entries
                key = f"{backend.value}, {2 if writes else 0} writes"
                m = ms[0]  # the counts are the same in every repeat; the times are medians
                row["runs"][key] = {
                    "userspace_exits_per_1k": round((m.exits[1] - m.exits[0] - 2) * per_k, 1),  # less "E\n"
                    "spec_ctrl_exits_per_1k": round((m.spec_exits[1] - m.spec_exits[0]) * per_k, 1),
                    "vmm_spec_ctrl_writes_per_1k": round((m.spec_writes[1] - m.spec_writes[0]) * per_k, 1),
                    "us_per_entry": round(statistics.median((x.ns[1] - x.ns[0]) / entries / 1000 for x in ms), 2),
                }
                progress(f"workload {policy.value} {key}: {row['runs'][key]}")
        rows.append(row)
    return rows


def machine() -> dict[str, str]:
    """This machine, in the words the table prints."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    vuln = ""
    try:
        with open("/sys/devices/system/cpu/vulnerabilities/spectre_v2", encoding="ascii", errors="replace") as f:
            vuln = f.read(300).strip()
    except OSError:
        pass
    return {"cpu": model or platform.processor() or "unknown", "cpus": str(os.cpu_count() or 0),
            "kernel": platform.release(), "spectre_v2": vuln, "python": platform.python_version()}


NATIVE_REPEATS = 31
"""Native timings are short (milliseconds), so many of them cost nothing, and the fastest is one no other process
on a shared machine interrupted."""


def bench(catalog: Catalog, kvm: Kvm | None, real: Host | None, *, native_calls: int = 20_000,
          guest_calls: int = 500, entries: int = 1000, repeats: int = 3,
          progress: Progress | None = None) -> dict[str, Any]:
    """Everything in one run. Without `kvm` (no /dev/kvm) the guest and workload parts are left out, and say so."""
    say = progress or (lambda _m: None)
    doc: dict[str, Any] = {"schema": "pvmit.bench-bhi/1", "machine": machine(), "entries": entries,
                           "native": native(native_calls, max(repeats, NATIVE_REPEATS), say)}
    if kvm is not None and real is not None:
        boot, _ = scenario_pools(catalog)["mixed"]
        shown = personality_for_pool(boot[0].facts, pool_bits([(m.id, m.facts) for m in boot]))
        personality = Personality(boot[0].id, shown, "pvmit bench bhi")
        doc["guest"] = in_guest(kvm, personality, real, guest_calls, repeats, say)
        doc["workload"] = workload(kvm, catalog, real, entries, repeats, say)
    else:
        doc["guest"] = doc["workload"] = None
        doc["skipped"] = "no usable /dev/kvm: the guest and workload measurements were not made"
    say("pools: every policy on the catalog's pools (modelled)")
    doc["pools"] = [r.summary() for r in compare(catalog)]
    doc["guests"] = [{"id": k.id, "what": k.what} for k in guest_kinds()]
    return doc


HEADERS = ("policy", "guest's loop (mixed pool)", "loop, native ns/entry", "loop, in guest us/entry",
           "userspace exits /1k entries, intercept (0 / 2 SPEC_CTRL writes)",
           "VMM SPEC_CTRL writes /1k, intercept (0 / 2)", "userspace exits /1k, hw mask, modelled (0 / 2)",
           "pre pool", "post pool", "mixed pool", "grown pool")
"""Columns of the one table (a pool cell: guests exposed, placements with BHI_DIS_S forced, guests running the
long loop, placements refused)."""


def _pool_cell(s: dict[str, Any]) -> str:
    return (f"exposed {len(s['guests_exposed'])}/{s['guests']}, forced {s['placements_forced']}/{s['placements']}, "
            f"long {len(s['guests_long_loop'])}/{s['guests']}, refused {s['placements_refused']}/{s['placements']}")


def _num(x: float) -> str:
    return f"{x:g}"


def table_rows(doc: dict[str, Any]) -> list[list[str]]:
    """One row per policy: the measured costs of the loop it makes a guest run, the exits it causes, and the pools."""
    rows = []
    work = {r["policy"]: r for r in doc.get("workload") or []}
    pools = {(s["policy"], s["scenario"]): s for s in doc["pools"]}
    for p in BhiPolicy:
        w = work.get(p.value)
        loop = w["loop"] if w else ("short" if p.forces_bhi_dis_s else "long")
        forced = p.forces_bhi_dis_s
        cells = [f"({p.letter}) {p.value}",
                 f"{loop} {'x'.join(map(str, LOOPS[loop]))}" + (" + BHI_DIS_S forced" if forced else "")
                 if loop in LOOPS else loop,
                 _num(doc["native"]["ns_per_call"][loop]) if loop in LOOPS else "-",
                 _num(doc["guest"]["us_per_call"][loop]) if doc.get("guest") and loop in LOOPS else "-"]
        if w:
            runs = w["runs"]
            cells += [f"{_num(runs['intercept, 0 writes']['userspace_exits_per_1k'])} / "
                      f"{_num(runs['intercept, 2 writes']['userspace_exits_per_1k'])}",
                      f"{_num(runs['intercept, 0 writes']['vmm_spec_ctrl_writes_per_1k'])} / "
                      f"{_num(runs['intercept, 2 writes']['vmm_spec_ctrl_writes_per_1k'])}",
                      f"{_num(runs['hw-mask, 0 writes']['userspace_exits_per_1k'])} / "
                      f"{_num(runs['hw-mask, 2 writes']['userspace_exits_per_1k'])}"]
        else:
            cells += ["-", "-", "-"]
        cells += [_pool_cell(pools[(p.value, s)]) if (p.value, s) in pools else "-"
                  for s in ("pre", "post", "mixed", "grown")]
        rows.append(cells)
    return rows


def notes(doc: dict[str, Any]) -> list[str]:
    """What each figure is, and what limits it here."""
    m = doc["machine"]
    out = [f"machine: {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']} (spectre_v2: {m['spectre_v2'] or '?'})",
           f"native: {doc['native']['calls']} calls per timing, the fastest of {doc['native']['repeats']} (medians "
           f"{_num(doc['native']['median_ns_per_call']['short'])} and "
           f"{_num(doc['native']['median_ns_per_call']['long'])} ns: the machine is shared); long/short = "
           f"{doc['native']['long_over_short']}"]
    if doc.get("guest"):
        g = doc["guest"]
        tsc = g["tsc_ticks_per_call"]
        out.append(f"in guest: {g['calls']} calls per run less a run without the loop "
                   f"({g['us_per_entry_without_a_loop']} us/entry), median of {g['repeats']}; TSC ticks per call "
                   f"short {_num(tsc['short'])}, long {_num(tsc['long'])}; long/short = {g['long_over_short']}")
    if doc.get("workload"):
        w = doc["workload"][0]
        out.append(f"exits: {doc['entries']} kernel entries of a guest that follows the policy, booted in the mixed "
                   f"pool (unreported, assume-worst), on a {w['host']} stand-in; us/entry per run in --json")
        d = next(r for r in doc["workload"] if r["policy"] == BhiPolicy.FORCE_BHI_DIS_S.value)["runs"]
        out.append(f"interception here: (d) with 2 IA32_SPEC_CTRL writes per entry takes "
                   f"{_num(d['intercept, 2 writes']['us_per_entry'])} us/entry intercepted, "
                   f"{_num(d['hw-mask, 2 writes']['us_per_entry'])} us/entry with the mask (modelled: no exit), "
                   f"{_num(d['intercept, 0 writes']['us_per_entry'])} us/entry without the writes")
    else:
        out.append(doc.get("skipped", ""))
    out.append("pools: catalog Intel server models with eIBRS; pre = before Alder Lake, post = Alder Lake and newer "
               "(BHI_CTRL or BHI_NO), grown = booted in pre, moved to post; cell = guests exposed / placements with "
               "BHI_DIS_S forced / guests running the long loop / placements refused, over "
               f"{len(doc['guests'])} guests: {', '.join(g['id'] for g in doc['guests'])} (modelled)")
    return out


def markdown(doc: dict[str, Any]) -> str:
    rows = table_rows(doc)
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes(doc)]) + "\n"


DOC_START = "<!-- pvmit bench bhi: start (written by `pvmit bench bhi`; edit outside these markers) -->"
DOC_END = "<!-- pvmit bench bhi: end -->"


def replace_block(text: str, block: str, when: str) -> str:
    """`text` with what lies between the markers replaced by `block`; ValueError when the markers are missing."""
    start, end = text.find(DOC_START), text.find(DOC_END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {DOC_START!r} and {DOC_END!r} are not both there, in that order")
    return text[:start + len(DOC_START)] + f"\n\nRun of {when}:\n\n" + block + "\n" + text[end:]
