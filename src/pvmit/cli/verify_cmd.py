"""`pvmit verify`: the exhaustive promise check over the catalog."""

from __future__ import annotations

import time

import click
from rich.table import Table

from pvmit.cli.output import emit_json, err, esc, out
from pvmit.cli.params import BoundedInt
from pvmit.cli.state import State, json_option, pass_state


@click.command("verify")
@click.option("--models", default="", metavar="IDS", help="Only these catalog models (comma-separated).")
@click.option("--jobs", type=BoundedInt(0, 1024), default=0, show_default=True,
              help="Worker processes (0: one per CPU).")
@json_option
@pass_state
def verify(st: State, models: str, jobs: int, json_out: bool) -> int:
    """For every ordered pair of catalog models, every reported mitigation set, every interface form, pool and
    operator setting: boot, report, migrate and keep writing through the real core, and count violations of the
    promise. First, the derivation of every model (and of every combination of the deciding bits) is checked against
    an independent statement of the rules (pvmit.safety.reference_rules). Runs on the built-in catalog plus any
    --catalog files. Exit 1 on any violation."""
    from pvmit.safety.verify import SETTINGS
    from pvmit.safety.verify import verify as run_verify

    chosen = [m.strip() for m in models.split(",") if m.strip()] or None
    for m in chosen or []:
        st.catalog.get(m)  # names are checked before any work starts

    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        """On a terminal one line rewritten in place; in a log, a line per tenth of the work, with elapsed time."""
        line = f"verify: {done}/{total} source models, {time.monotonic() - started:.0f} s"
        if err.is_terminal:
            err.print(line, end="\r" if done < total else "\n")
        elif done == total or done % max(1, total // 10) == 0:
            err.print(line)

    tally = run_verify([str(c) for c in st.catalogs], chosen, jobs=jobs, progress=progress)
    doc = tally.to_json()
    doc["operator_settings"] = [name for name, _ in SETTINGS]
    if json_out:
        emit_json(doc)
    else:
        t = Table(title="pvmit verify: the promise over every scenario")
        for col in ("derivations checked", "pairs checked", "scenarios", "accepted", "accepted with forced controls",
                    "refused", "operator overrides reported", "violations"):
            t.add_column(col, justify="right")
        t.add_row(str(doc["derivations_checked"]), str(doc["pairs"]), str(doc["scenarios"]), str(doc["accepted"]),
                  str(doc["accepted_with_forced_controls"]), str(doc["refused"]),
                  str(doc["operator_overrides_reported"]), str(doc["violations"]))
        out.print(t)
        pt = Table(title="the BHI policies: the promise kept under each; what each leaves to the guest by design "
                         "(reported, not a violation)")
        for col in ("BHI policy", "scenarios", "accepted", "accepted with forced controls", "refused",
                    "exposed by design", "guests exposed by design (pvmit.interface.bhi_compare)"):
            pt.add_column(col, justify="left" if col.startswith(("BHI", "guests")) else "right", overflow="fold")
        for name, p in doc["bhi_policies"].items():
            pt.add_row(name, str(p["scenarios"]), str(p["accepted"]), str(p["accepted_with_forced_controls"]),
                       str(p["refused"]), str(p["exposed_by_design"]),
                       esc(", ".join(p["guests_exposed_by_design"]) or "none"))
        out.print(pt)
        for v in doc["violation_examples"]:
            out.print("[red]violation[/] " + esc(str(v)))
    return 1 if tally.violations else 0
