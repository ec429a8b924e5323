"""The plan as Arrow tables, written as Parquet or CSV. Built column-wise from the plan's arrays (dictionary
columns for repeated text), so a million VMs is a few array operations.

Tables: vms (per VM: its class, pool, verdict where it runs, destination counts), pairs (per class pair: verdict,
forced controls, reasons), hosts, host_classes, vm_classes, pools, and on request moves (per VM and destination
host: verdict, forced controls, reasons), which has VMs x hosts rows and is for small fleets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from pvmit.errors import InputError
from pvmit.fleet.inventory import write_table
from pvmit.fleet.plan import VERDICTS, Plan, Verdict
from pvmit.userfiles import staged

MOVES_LIMIT = 20_000_000
"""Most rows `moves` may have: per-VM destination lists are VMs x hosts; beyond this use the class tables."""
REASON_SEP = " | "

_VERDICT_WORDS = pa.array([v.word for v in VERDICTS], type=pa.string())


def _dict(indices: npt.NDArray[np.integer[Any]], values: list[str] | pa.Array) -> pa.DictionaryArray:
    vals = values if isinstance(values, pa.Array) else pa.array(values, type=pa.string())
    return pa.DictionaryArray.from_arrays(pa.array(indices.astype(np.int32, copy=False), type=pa.int32()), vals)


def _verdicts(v: npt.NDArray[np.integer[Any]]) -> pa.DictionaryArray:
    return _dict(v, _VERDICT_WORDS)


def pool_ids(plan: Plan) -> list[str]:
    return [p.id for p in plan.pools] + ["-"]


def vms_table(plan: Plan) -> pa.Table:
    f = plan.fleet
    pool_of_class = np.where(plan.vm_class_pool < 0, len(plan.pools), plan.vm_class_pool).astype(np.int32)
    counts = plan.vm_counts
    return pa.table({
        "vm": f.vm_names,
        "host": _dict(f.vm_host, f.host_names),
        "vm_class": pa.array(f.vm_class.astype(np.int32, copy=False)),
        "pool": _dict(pool_of_class[f.vm_class], pool_ids(plan)),
        "verdict_here": _verdicts(plan.vm_here),
        "safe_destinations": pa.array(counts[:, Verdict.SAFE]),
        "forced_destinations": pa.array(counts[:, Verdict.FORCED]),
        "exposed_destinations": pa.array(counts[:, Verdict.EXPOSED]),
        "has_safe_destination": pa.array(plan.movable > 0),
    })


def pairs_table(plan: Plan) -> pa.Table:
    f = plan.fleet
    nvc, nhc = plan.verdict.shape
    vi = np.repeat(np.arange(nvc), nhc)
    hi = np.tile(np.arange(nhc), nvc)
    mv = plan.move_of.reshape(-1).astype(np.int64)
    return pa.table({
        "vm_class": pa.array(vi.astype(np.int32)),
        "vm_class_label": _dict(vi, [c.label for c in f.vm_classes]),
        "host_class": pa.array(hi.astype(np.int32)),
        "host_class_label": _dict(hi, [c.label for c in f.host_classes]),
        "verdict": _verdicts(plan.verdict.reshape(-1)),
        "accepted_by_check": pa.array([plan.moves[int(k)].accepted for k in mv], type=pa.bool_()),
        "forced_controls": _dict(mv, [",".join(m.forced) for m in plan.moves]),
        "reasons": _dict(mv, [REASON_SEP.join(m.reasons) for m in plan.moves]),
        "warnings": _dict(mv, [REASON_SEP.join(m.warnings) for m in plan.moves]),
        "constraining_bits": _dict(mv, [",".join(m.bits) for m in plan.moves]),
        "hosts": pa.array(plan.host_class_size[hi]),
        "vms": pa.array(plan.vm_class_size[vi]),
    })


def hosts_table(plan: Plan) -> pa.Table:
    f = plan.fleet
    hc = f.host_classes
    return pa.table({
        "host": pa.array(f.host_names, type=pa.string()),
        "host_class": pa.array(f.host_class.astype(np.int32)),
        "cpu": _dict(f.host_class, [c.cpu for c in hc]),
        "settings": _dict(f.host_class, [c.settings.label() for c in hc]),
        "cluster": pa.array(f.host_cluster, type=pa.string()),
    })


def host_classes_table(plan: Plan) -> pa.Table:
    hc = plan.fleet.host_classes
    return pa.table({
        "host_class": pa.array(np.arange(len(hc), dtype=np.int32)),
        "cpu": pa.array([c.cpu for c in hc], type=pa.string()),
        "settings": pa.array([c.settings.label() for c in hc], type=pa.string()),
        "hosts": pa.array(plan.host_class_size),
    })


def vm_classes_table(plan: Plan) -> pa.Table:
    vc = plan.fleet.vm_classes
    ids = pool_ids(plan)
    return pa.table({
        "vm_class": pa.array(np.arange(len(vc), dtype=np.int32)),
        "personality": pa.array([c.personality for c in vc], type=pa.string()),
        "mitigations": pa.array([c.mitigations for c in vc], type=pa.string()),
        "form": pa.array([c.form.value if c.form else "none" for c in vc], type=pa.string()),
        "supported": pa.array([c.to_json()["supported"] for c in vc], type=pa.string()),
        "settings": pa.array([c.settings.label() for c in vc], type=pa.string()),
        "vms": pa.array(plan.vm_class_size),
        "pool": pa.array([ids[int(p)] for p in plan.vm_class_pool], type=pa.string()),
        **{f"{v.word}_hosts": pa.array(plan.class_counts[:, v]) for v in VERDICTS},
    })


def pools_table(plan: Plan) -> pa.Table:
    hc = plan.fleet.host_classes
    return pa.table({
        "pool": pa.array([p.id for p in plan.pools], type=pa.string()),
        "hosts": pa.array([p.hosts for p in plan.pools], type=pa.int64()),
        "vms": pa.array([p.vms for p in plan.pools], type=pa.int64()),
        "hosts_forcing_controls": pa.array([p.forcing_hosts for p in plan.pools], type=pa.int64()),
        "host_classes": pa.array([",".join(map(str, p.host_classes)) for p in plan.pools], type=pa.string()),
        "host_cpus": pa.array([",".join(sorted({hc[h].cpu for h in p.host_classes})) for p in plan.pools],
                              type=pa.string()),
        "vm_classes": pa.array([",".join(map(str, p.vm_classes)) for p in plan.pools], type=pa.string()),
        "mitigation_enum": pa.array([p.mitigation_enum for p in plan.pools], type=pa.int64()),
        "shows": pa.array([",".join(p.shows) for p in plan.pools], type=pa.string()),
        "constraining_bits": pa.array([",".join(p.constraining_bits) for p in plan.pools], type=pa.string()),
    })


def moves_table(plan: Plan, limit: int = MOVES_LIMIT) -> pa.Table:
    """One row per VM and destination host (its own host left out): VMs x (hosts - 1) rows."""
    f = plan.fleet
    nv, nh = f.num_vms, f.num_hosts
    rows = nv * max(nh - 1, 0)
    if rows > limit:
        raise InputError(f"per-VM destination lists would have {rows:,} rows (VMs x hosts), more than {limit:,}; "
                         "use the per-class tables (pairs, vm_classes), which hold the same answers")
    vm = np.repeat(np.arange(nv, dtype=np.int64), nh)
    dest = np.tile(np.arange(nh, dtype=np.int64), nv)
    keep = dest != f.vm_host[vm]
    vm, dest = vm[keep], dest[keep]
    mv = plan.move_of[f.vm_class[vm], f.host_class[dest]].astype(np.int64)
    return pa.table({
        "vm": f.vm_names.take(pa.array(vm)) if nv else pa.array([], type=pa.string()),
        "host": _dict(f.vm_host[vm], f.host_names),
        "destination": _dict(dest, f.host_names),
        "destination_class": pa.array(f.host_class[dest].astype(np.int32)),
        "verdict": _verdicts(plan.verdict[f.vm_class[vm], f.host_class[dest]]),
        "forced_controls": _dict(mv, [",".join(m.forced) for m in plan.moves]),
        "reasons": _dict(mv, [REASON_SEP.join(m.reasons) for m in plan.moves]),
    })


def write_tables(plan: Plan, out_dir: Path, fmt: str, per_vm: bool = False) -> list[Path]:
    """Write every table as OUT_DIR/<table>.<fmt>; `moves` only with per_vm. Returns the paths written."""
    if fmt not in ("parquet", "csv"):
        raise InputError(f"table format must be parquet or csv, not {fmt!r}")
    tables = {"vms": vms_table, "pairs": pairs_table, "hosts": hosts_table, "host_classes": host_classes_table,
              "vm_classes": vm_classes_table, "pools": pools_table}
    if per_vm:
        tables["moves"] = moves_table
    written = []
    with staged() as s:  # every table, or (after an error) none and no directory made for them
        s.directory(out_dir)
        for name, build in tables.items():
            path = out_dir / f"{name}.{fmt}"
            write_table(build(plan), s.path(path))
            written.append(path)
    return written
