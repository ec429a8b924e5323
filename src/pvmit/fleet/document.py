"""The plan as one JSON document (`pvmit fleet plan --json`, schema pvmit.fleet-plan/1).

Per-VM answers are given through classes so the document stays proportional to the fleet: each VM names its
class, and each VM class lists, for every host class, the verdict and the move (forced controls and reasons; moves
are shared, many pairs have the same one). Host classes list their hosts. With per_vm, each VM also lists its
destination hosts by verdict (its own host left out).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pvmit.errors import InputError
from pvmit.fleet.plan import VERDICTS, Plan
from pvmit.fleet.tables import MOVES_LIMIT

SCHEMA = "pvmit.fleet-plan/1"
ERRORS_SHOWN = 1000


def plan_document(plan: Plan, per_vm: bool = False) -> dict[str, Any]:
    f = plan.fleet
    if per_vm and f.num_vms * max(f.num_hosts - 1, 0) > MOVES_LIMIT:
        raise InputError(f"per-VM destination lists would name {f.num_vms * (f.num_hosts - 1):,} hosts (VMs x "
                         f"hosts), more than {MOVES_LIMIT:,}; the per-class answers in the document hold the same")
    pools = [p.id for p in plan.pools]
    hosts_by_class: list[list[str]] = [[] for _ in f.host_classes]
    for name, k in zip(f.host_names, f.host_class.tolist(), strict=True):
        hosts_by_class[k].append(name)
    names = f.vm_names.to_pylist()
    vms: list[dict[str, Any]] = []
    host_class = f.host_class
    for i in range(f.num_vms):
        cls = int(f.vm_class[i])
        pool = int(plan.vm_class_pool[cls])
        row: dict[str, Any] = {
            "name": names[i], "host": f.host_names[int(f.vm_host[i])], "class": cls,
            "pool": pools[pool] if pool >= 0 else None, "verdict_here": VERDICTS[int(plan.vm_here[i])].word,
            "destinations": {v.word: int(plan.vm_counts[i, v]) for v in VERDICTS},
        }
        if per_vm:
            own = int(f.vm_host[i])
            verdicts = plan.verdict[cls, host_class]
            row["destination_hosts"] = {
                v.word: [f.host_names[int(h)] for h in np.flatnonzero(verdicts == v) if int(h) != own]
                for v in VERDICTS}
        vms.append(row)
    errors = f.errors.first(ERRORS_SHOWN)
    return {
        "schema": SCHEMA,
        "inventory": f.sources,
        "counts": plan.counts(),
        "errors": [e.to_json() for e in errors],
        "errors_total": f.errors.total,
        "warnings": f.warnings,
        "bhi_policy": f.bhi_policy.value,
        "clusters": f.clusters,
        "host_classes": [{"id": j, **c.to_json(), "hosts": int(plan.host_class_size[j]),
                          "host_names": hosts_by_class[j]} for j, c in enumerate(f.host_classes)],
        "vm_classes": [{
            "id": i, **c.to_json(), "vms": int(plan.vm_class_size[i]),
            "pool": pools[int(plan.vm_class_pool[i])] if plan.vm_class_pool[i] >= 0 else None,
            "hosts": {v.word: int(plan.class_counts[i, v]) for v in VERDICTS},
            "destinations": [{"host_class": j, "verdict": VERDICTS[int(plan.verdict[i, j])].word,
                              "move": int(plan.move_of[i, j])} for j in range(len(f.host_classes))],
        } for i, c in enumerate(f.vm_classes)],
        "moves": [{"id": k, **m.to_json()} for k, m in enumerate(plan.moves)],
        "pools": [p.to_json() for p in plan.pools],
        "vms_without_safe_destination": [names[int(i)] for i in plan.stranded],
        "vms": vms,
    }


def vm_detail(plan: Plan, name: str) -> dict[str, Any]:
    """One VM's destinations by host class, its own host left out (`pvmit fleet plan --vm NAME`)."""
    import pyarrow.compute as pc

    f = plan.fleet
    i = pc.index(f.vm_names, name).as_py()
    if i is None or i < 0:
        raise InputError(f"--vm: no VM named {name!r} in the plan (it may be in a row with errors)")
    cls, own = int(f.vm_class[i]), int(f.vm_host[i])
    destinations = []
    for j, hc in enumerate(f.host_classes):
        hosts = [f.host_names[int(h)] for h in np.flatnonzero(f.host_class == j) if int(h) != own]
        if hosts:
            m = plan.moves[int(plan.move_of[cls, j])]
            destinations.append({"host_class": j, "label": hc.label, "hosts": hosts, **m.to_json()})
    return {"name": name, "host": f.host_names[own], "class": cls, "class_label": f.vm_classes[cls].label,
            "verdict_here": VERDICTS[int(plan.vm_here[i])].word,
            "destinations_by_verdict": {v.word: int(plan.vm_counts[i, v]) for v in VERDICTS},
            "destinations": destinations}
