"""`pvmit demo`: the whole story in under a minute, with real VMM processes on /dev/kvm.

1. A guest boots as QEMU's Icelake-Server-v2 (no eIBRS shown), so like Linux it relies on retpoline, on a host
   standing in for Ice Lake-SP, where retpoline works: nothing is forced.
2. It migrates live to a Sapphire Rapids stand-in, where RET can fall back to the BTB: the destination forces
   RRSBA_DIS_S before the guest runs there, and the guest keeps counting where it stopped.
3. It is offered to a Cascade Lake stand-in, which has RRSBA behaviour but no RRSBA_DIS_S: refused, with the reason,
   and the guest keeps running on Sapphire Rapids.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import click

from pvmit.cli.output import emit_json, esc, out
from pvmit.cli.state import State, json_option, pass_state
from pvmit.kvm.system import Kvm
from pvmit.node.cluster import PAUSED, RESUMED, VmmHandle
from pvmit.node.process import DEFAULT_HEARTBEAT

GUEST, SOURCE, TARGET, REFUSER = "icelake-server-v2", "icelake-sp", "sapphirerapids", "cascadelake-sp"


def _say(json_out: bool, text: str, style: str = "") -> None:
    if not json_out:
        out.print(f"[{style}]{esc(text)}[/]" if style else esc(text))


@click.command("demo")
@json_option
@pass_state
def demo(st: State, json_out: bool) -> int:
    """Boot a retpoline guest, migrate it live to a host that needs RRSBA_DIS_S, then show a refused move."""
    Kvm().close()  # fail early, with the reason, where /dev/kvm cannot be used
    started = time.monotonic()
    summary: dict[str, Any] = {"schema": "pvmit.demo/1"}
    cat = [str(p) for p in st.catalogs]
    with tempfile.TemporaryDirectory(prefix="pvmit-demo-") as d:
        work = Path(d)
        handles: list[VmmHandle] = []
        try:
            _say(json_out, "== 1. boot on the source", "bold")
            src = VmmHandle(work, "ice-lake", ["--guest-cpu", GUEST, "--host-cpu", SOURCE, "--form", "intel",
                                               "--pool", f"{SOURCE},{TARGET}", "--memory", "64M"], catalogs=cat)
            handles.append(src)
            spr = VmmHandle(work, "sapphire-rapids", ["--incoming", f"unix:{work / 'spr.mig'}", "--host-cpu", TARGET],
                            catalogs=cat)
            clx = VmmHandle(work, "cascade-lake", ["--incoming", f"unix:{work / 'clx.mig'}", "--host-cpu", REFUSER],
                            catalogs=cat)
            handles += [spr, clx]
            src.wait_counts(3)
            for line in src.lines():
                if line.startswith(("vmm: booted", "vmm: nothing forced", "vmm: forced")):
                    _say(json_out, f"  {line}")
            s = src.status()
            summary["source"] = {"host": s["host"], "spec_ctrl": s["spec_ctrl"], "heartbeat": s["heartbeat"]}
            _say(json_out, f"  guest relies on retpoline (what Linux picks when shown {GUEST}); on {s['host']} "
                           f"retpoline works, so IA32_SPEC_CTRL forced bits: {s['spec_ctrl']['forced_mask']}")
            _say(json_out, f"  {s['heartbeat']}")

            _say(json_out, "== 2. live migration to a newer host", "bold")
            result = src.migrate(f"unix:{work / 'spr.mig'}",
                                 on_event=lambda e: _say(json_out, f"  migrate: {e['event']}"))
            summary["migration"] = dict(result)
            if not result["migrated"]:
                _say(json_out, f"  not moved: {result['reason']}", "red")
                summary["ok"] = False
                return _finish(json_out, summary)
            spr.wait_counts(2)
            s2 = spr.status()
            paused, resumed = src.monotonic(PAUSED), spr.monotonic(RESUMED)
            downtime = (resumed - paused) if paused and resumed else None
            before, after = src.counts(), spr.counts()
            continued = bool(before and after and after[0] == before[-1] + DEFAULT_HEARTBEAT)
            summary["migration"] = {**result, "downtime_ms": round(downtime * 1e3, 3) if downtime else None,
                                    "last_count_on_source": before[-1] if before else None,
                                    "first_count_on_destination": after[0] if after else None,
                                    "continued": continued, "destination_spec_ctrl": s2["spec_ctrl"]}
            _say(json_out, f"  moved ({result['mode']}, {result['pages_sent']} pages, "
                           f"downtime {downtime * 1e3:.1f} ms)" if downtime else "  moved")
            _say(json_out, f"  the destination forces {', '.join(result['ready'].get('forced', [])) or 'nothing'}: "
                           f"IA32_SPEC_CTRL in effect {s2['spec_ctrl']['effective']}, the guest still reads "
                           f"{s2['spec_ctrl']['guest_value']}; modelled only (this machine lacks it): "
                           f"{', '.join(s2['spec_ctrl']['modelled_only']) or 'none'}")
            if continued:
                _say(json_out, f"  count on the source {before[-1]:#x} -> first on the destination {after[0]:#x}: "
                               f"the guest continued where it stopped, one heartbeat later")
            else:
                _say(json_out, f"  the counts do not line up (last on the source "
                               f"{before[-1] if before else None}, first on the destination "
                               f"{after[0] if after else None}): state was lost", "red")

            _say(json_out, "== 3. a destination that cannot protect the guest", "bold")
            refused = spr.migrate(f"unix:{work / 'clx.mig'}")
            spr.wait_counts(2)
            summary["refusal"] = refused
            if refused["paused_at"] is None and not refused["migrated"]:
                _say(json_out, "  Cascade Lake refused before the guest paused; nothing was copied:", "red")
            else:
                _say(json_out, f"  Cascade Lake: {refused['reason'] or 'moved'}", "red")
            for reason in refused["verdict"].get("reasons", []):
                _say(json_out, f"  - {reason}")
            _say(json_out, f"  the guest is still running on Sapphire Rapids: {spr.status()['heartbeat']}")
            summary["seconds"] = round(time.monotonic() - started, 2)
            summary["ok"] = bool(continued and not refused["migrated"] and refused["paused_at"] is None)
        finally:
            for h in handles:
                h.stop()
    return _finish(json_out, summary)


def _finish(json_out: bool, summary: dict[str, Any]) -> int:
    if json_out:
        emit_json(summary)
    else:
        _say(json_out, f"done in {summary.get('seconds')} s" if summary.get("ok") else "the demo did not go as "
             "described above", "bold")
    return 0 if summary.get("ok") else 1
