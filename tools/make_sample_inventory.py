#!/usr/bin/env python3
"""Rebuild src/pvmit/fleet/data/sample-inventory.json, the sample inventory pvmit ships.

A synthetic fleet (`pvmit.fleet.generate`, fixed seed) of 40 hosts and 300 VMs over two sites, plus hand-written
rows that show what the generator does not: a host given as the facts `pvmit host --json` read on a real machine
(--host-json; an AMD EPYC Milan read inside a KVM guest when the sample was made), VMs with an explicit
MITIGATION_ENUM, and VMs whose operator settings travel with them.

    .venv/bin/python tools/make_sample_inventory.py --host-json host.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pvmit.catalog.loader import load_catalog
from pvmit.fleet.generate import as_records, generate
from pvmit.fleet.inventory import SCHEMA

OUT = Path(__file__).resolve().parent.parent / "src" / "pvmit" / "fleet" / "data" / "sample-inventory.json"

EXTRA_VMS = [
    # booted as QEMU Icelake-Server-v2 (no eIBRS shown, so the guest uses retpoline) and promised both bits
    {"name": "billing-db-01", "host": "{icelake-sp}", "personality": "icelake-server-v2",
     "mitigations": "retpoline", "form": "intel", "supported": "retpoline,bhb-short"},
    {"name": "billing-db-02", "host": "{icelake-sp}", "personality": "icelake-server-v2",
     "mitigations": "retpoline", "form": "neutral", "supported": "retpoline"},
    # a guest on the lab host: EPYC-Milan personality, reports nothing it relies on
    {"name": "lab-runner-01", "host": "lab-epyc-01", "personality": "EPYC-Milan", "mitigations": "none",
     "form": "kvm", "supported": "none"},
    # unenlightened, and the operator trusts it (nothing forced; warnings say where it is at risk)
    {"name": "legacy-erp-01", "host": "{cascadelake-sp}", "personality": "Cascadelake-Server",
     "mitigations": "unenlightened", "form": "none", "unreported": "trust"},
    # the operator pins RRSBA_DIS_S on for this VM wherever it runs
    {"name": "hsm-gw-01", "host": "{sapphirerapids}", "personality": "Icelake-Server", "mitigations": "bhb-short",
     "form": "kvm", "force_on": "RRSBA_DIS_S"},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host-json", type=Path, required=True, help="output of `pvmit host --json` on a real host")
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    args = ap.parse_args()
    catalog = load_catalog()
    hosts, vms = generate(catalog, 300, 40, seed=7, sites=2)
    host_doc = json.loads(args.host_json.read_text())
    host_rows = as_records(hosts) + [{"name": "lab-epyc-01", "cpu": host_doc["facts"], "cluster": "lab"}]
    first_of = {}  # the first host of each catalog model, for the hand-written VMs ("{model}" in EXTRA_VMS)
    for h in host_rows:
        if isinstance(h["cpu"], str):
            first_of.setdefault("{" + h["cpu"] + "}", h["name"])
    extra = [{**v, "host": first_of.get(v["host"], v["host"])} for v in EXTRA_VMS]
    doc = {"schema": SCHEMA, "hosts": host_rows, "vms": as_records(vms) + extra}
    text = json.dumps(doc, indent=1)
    args.output.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {args.output}: {len(host_rows)} hosts, {len(doc['vms'])} VMs")


if __name__ == "__main__":
    main()
