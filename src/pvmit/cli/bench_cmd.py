"""`pvmit bench ...`: benchmarks that print their figures (timings never decide a test)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from pvmit.cli.fleet_cmd import MAX_HOSTS, MAX_SEED, MAX_VMS
from pvmit.cli.output import emit_json, err, esc, out
from pvmit.cli.params import BoundedFloat, BoundedInt
from pvmit.cli.state import State, json_option, pass_state
from pvmit.safetext import safe_text


@click.group("bench")
def bench() -> None:
    """Benchmarks, measured side by side in one run."""


@bench.command("exits")
@click.option("--iterations", type=BoundedInt(1, 10 ** 9), default=20_000, show_default=True, help="RDMSRs per loop.")
@click.option("--repeats", type=BoundedInt(1, 1000), default=3, show_default=True,
              help="Interleaved repeats of the four loops.")
@click.option("--guest-cpu", default="EPYC-Milan", show_default=True, metavar="MODEL", help="Guest personality.")
@json_option
@pass_state
def exits(st: State, iterations: int, repeats: int, guest_cpu: str, json_out: bool) -> int:
    """What pvmit's exit handling costs next to KVM's own and a bare userspace exit; ratio = pvmit / bare."""
    from pvmit.bench.exits import bench as run_bench
    from pvmit.kvm.system import Kvm
    from pvmit.vmm.hosts import this_machine
    from pvmit.vmm.personality import resolve

    personality = resolve(st.catalog, guest_cpu)
    host, _ = this_machine(st.catalog)
    with Kvm() as kvm:
        doc = run_bench(kvm, personality, host, iterations, repeats,
                        progress=lambda m: err.print(esc(f"bench: {m}")))
    if json_out:
        emit_json(doc)
        return 0
    us = doc["us_per_rdmsr"]
    assert isinstance(us, dict)
    out.print(f"RDMSR handled inside KVM (IA32_TSC):            {us['kvm']:8.3f} us")
    out.print(f"userspace exit, do-nothing handler:             {us['bare']:8.3f} us")
    out.print(f"interface MSR through pvmit's full path:        {us['pvmit']:8.3f} us")
    out.print(f"IA32_SPEC_CTRL with nothing forced:             {us['spec_ctrl_not_forced']:8.3f} us, "
              f"{doc['spec_ctrl_userspace_exits']} userspace exits")
    out.print(f"ratio pvmit / bare = {doc['ratio']:.3f} (target <= {doc['ratio_target']}); pvmit adds "
              f"{doc['pvmit_added_us']:.3f} us per exit")
    return 0


@bench.command("bhi")
@click.option("--native-calls", type=BoundedInt(1, 10 ** 9), default=20_000, show_default=True,
              help="Calls of each BHB-clearing sequence per native timing (at least 31 timings, the fastest kept).")
@click.option("--guest-calls", type=BoundedInt(1, 10 ** 6), default=500, show_default=True,
              help="Calls of each sequence per run inside the test guest (each instruction is emulated here).")
@click.option("--entries", type=BoundedInt(1, 10 ** 6), default=1000, show_default=True,
              help="Kernel entries of the workload guest per policy and backend.")
@click.option("--repeats", type=BoundedInt(1, 100), default=5, show_default=True, help="Interleaved repeats.")
@click.option("--doc", "doc_path", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Write the table into FILE between its markers (default: docs/bhi.md when it exists here).")
@click.option("--no-doc", is_flag=True, help="Write no file.")
@json_option
@pass_state
def bhi(st: State, native_calls: int, guest_calls: int, entries: int, repeats: int, doc_path: Path | None,
        no_doc: bool, json_out: bool) -> int:
    """The four BHI policies side by side: the short and long BHB-clearing sequences timed natively and in the test
    guest, userspace exits and IA32_SPEC_CTRL writes per 1,000 kernel entries under each policy (interception
    measured, the hardware mask modelled), and over the catalog's pools who is exposed, forced, paying the long loop
    or refused (modelled). Prints one table and writes it into docs/bhi.md with the machine it ran on."""
    import datetime

    from pvmit.bench.bhi import HEADERS, markdown, notes, replace_block, table_rows
    from pvmit.bench.bhi import bench as run_bench
    from pvmit.errors import InputError, PvmitError
    from pvmit.kvm.errors import KvmUnavailable
    from pvmit.kvm.system import Kvm
    from pvmit.userfiles import FileError, read_text, write_atomic
    from pvmit.vmm.hosts import this_machine

    target = None if no_doc else doc_path or (Path("docs/bhi.md") if Path("docs/bhi.md").is_file() else None)
    if doc_path is not None and no_doc:
        raise InputError("--doc and --no-doc together")
    kvm: Kvm | None = None
    real = None
    try:
        kvm = Kvm()
        real, _ = this_machine(st.catalog)
    except KvmUnavailable as e:
        err.print(esc(f"bench: /dev/kvm is not usable ({e}): native timings and the pools only"))
    except PvmitError:
        if kvm is not None:
            kvm.close()
        raise
    try:
        doc = run_bench(st.catalog, kvm, real, native_calls=native_calls, guest_calls=guest_calls, entries=entries,
                        repeats=repeats, progress=lambda m: err.print(esc(f"bench: {m}")))
    finally:
        if kvm is not None:
            kvm.close()
    when = f"`pvmit bench bhi` on {datetime.date.today().isoformat()}"
    if target is not None:
        try:
            text = read_text(target, "the BHI document", 4 << 20)
            write_atomic(target, replace_block(text, markdown(doc), when))
            err.print(esc(f"bench: table written to {target}"))
        except (FileError, ValueError) as e:
            raise InputError(f"--doc {target}: {e}") from None
    if json_out:
        emit_json(doc)
        return 0
    t = Table(title="pvmit bench bhi: the four BHI policies side by side")
    for h in HEADERS:
        t.add_column(h, overflow="fold")
    for row in table_rows(doc):
        t.add_row(*(esc(c) for c in row))
    out.print(t)
    for n in notes(doc):
        out.print(esc(n))
    return 0


@bench.command("migrate")
@click.option("--sizes", default="64M,512M", show_default=True, help="Guest memory sizes, comma-separated.")
@click.option("--repeats", default=3, show_default=True, type=BoundedInt(1, 100))
@click.option("--fill", "fills", default="zero,random", show_default=True,
              help="Guest memory content: zero, random, or both (comma-separated).")
@click.option("--vs-qemu", is_flag=True, help="Also migrate QEMU guests of the same size and content, side by side.")
@click.option("--tls", is_flag=True, help="Also migrate over loopback TCP with mutual TLS (the cost of encryption).")
@json_option
@pass_state
def migrate(st: State, sizes: str, repeats: int, fills: str, vs_qemu: bool, tls: bool, json_out: bool) -> int:
    """Migration time and downtime per guest size and memory content, the share of downtime in pvmit's interface
    checks, and with --vs-qemu QEMU's migration of the same guest in the same run, with the ratios."""
    from pvmit.bench.migrate import FILLS
    from pvmit.bench.migrate import bench as run_bench
    from pvmit.cli.vmm_cmd import parse_size
    from pvmit.errors import InputError
    from pvmit.kvm.system import Kvm

    wanted = [s.strip() for s in sizes.split(",") if s.strip()]
    for s in wanted:
        parse_size(s)
    contents = tuple(f.strip() for f in fills.split(",") if f.strip())
    if not contents or any(f not in FILLS for f in contents):
        raise InputError(f"--fill takes {', '.join(FILLS)} (comma-separated)")
    Kvm().close()
    doc = run_bench(wanted, repeats, [str(c) for c in st.catalogs], fills=contents, tls=tls, vs_qemu=vs_qemu,
                    progress=lambda m: err.print(esc(f"bench: {m}")))
    if json_out:
        emit_json(doc)
        return 0
    out.print("size   fill    transport   total s  downtime ms  (source)  MiB sent  checks ms  share %  apply ms")
    for m in doc["median"].values():
        checks = (f"{m['interface_check_ms']:>9.3f}  {m['check_share_pct']:>7.3f}  {m['apply_ms']:>8.3f}"
                  if "interface_check_ms" in m else f"{'-':>9}  {'-':>7}  {'-':>8}")
        out.print(f"{m['size']:>5}  {m['fill']:<6}  {m['transport']:<10} {m['total_s']:>8.4f}  "
                  f"{m['downtime_ms']:>11.3f}  {m['source_downtime_ms']:>8.3f}  {m['mib_sent']:>8}  {checks}")
    for key, r in doc["ratios"].items():
        out.print(esc(f"{key}: " + ", ".join(f"{k} {v}" for k, v in r.items())))
    out.print(esc(f"medians of {repeats} runs; QEMU: {doc['qemu']}. Targets: total no more than QEMU's with random "
                  "memory and 3x QEMU's with zero memory, downtime no more than QEMU's, interface checks under 1% "
                  "of the downtime. downtime: stopped on the source to running on the destination; (source): until the "
                  "source is done (QEMU's own figure). checks: pvmit's interface checks after the pause; apply: "
                  "putting the forced controls into KVM"))
    return 0


@bench.command("soak")
@click.option("--minutes", default=2.0, show_default=True, type=BoundedFloat(0.1, 24 * 60),
              help="How long to throw faults at the VMMs.")
@click.option("--guests", default=2, show_default=True, type=BoundedInt(1, 8))
@click.option("--seed", type=BoundedInt(0, 2**32), default=None, help="Repeat a run's sequence of faults.")
@json_option
def soak(minutes: float, guests: int, seed: int | None, json_out: bool) -> int:
    """Several VMM processes, counting guests, random live migrations back and forth, destinations killed mid-copy
    and after the pause, stalled peers, corrupted streams, lost commits, hostile control clients and crafted
    streams; then the guests' counts are checked across every log. Exit 1 if any guest was lost, ran twice, lost or
    repeated a count, ran unprotected, or a VMM showed a traceback."""
    import tempfile

    from pvmit.bench.soak import run as run_soak
    from pvmit.kvm.system import Kvm

    Kvm().close()
    with tempfile.TemporaryDirectory(prefix="pvmit-soak-") as d:
        report = run_soak(Path(d), minutes * 60, guests=guests, seed=seed,
                          progress=lambda m: err.print(esc(f"soak: {m}")))
    doc = report.to_json()
    if json_out:
        emit_json(doc)
    else:
        out.print(f"soak of {doc['seconds']} s, {guests} guests on {guests + 3} VMM processes: "
                  f"{doc['migrations_committed']} migrations committed, {doc['counts_checked']} counts checked")
        for key in ("guests_lost", "guests_running_twice", "count_gaps", "count_repeats", "promise_violations",
                    "tracebacks"):
            out.print(f"  {key.replace('_', ' '):<22} {doc[key]}")
        out.print("  injected:")
        for k, v in doc["injected"].items():
            out.print(esc(f"    {k:<34} {v}"))
        for p in doc["problems"]:
            out.print(esc(f"  [problem] {p}"))
        out.print("[green]ok[/]" if report.ok else "[red]FAILED[/]")
    return 0 if report.ok else 1


@bench.command("fleet")
@click.option("--vms", type=BoundedInt(0, MAX_VMS), default=1_000_000, show_default=True,
              help="VMs in the generated inventory.")
@click.option("--hosts", type=BoundedInt(1, MAX_HOSTS), default=10_000, show_default=True,
              help="Hosts in the generated inventory.")
@click.option("--cores", type=BoundedInt(1, 4096), default=2, show_default=True,
              help="CPUs the planner process is pinned to.")
@click.option("--inventory", type=click.Path(exists=True, path_type=Path), default=None, metavar="PATH",
              help="Plan this inventory instead of generating one.")
@click.option("--seed", type=BoundedInt(0, MAX_SEED), default=1, show_default=True, help="Seed of the generated fleet.")
@json_option
@pass_state
def fleet(st: State, vms: int, hosts: int, cores: int, inventory: Path | None, seed: int, json_out: bool) -> int:
    """Plan a large fleet end to end (a generated 1M-VM, 10k-host Parquet inventory by default) in a fresh
    process pinned to --cores CPUs; print seconds and peak memory against the targets (5 s, 2 GiB; set for
    --vms 10000000 --hosts 100000). Exit 1 when a target is missed or the planner fails."""
    from pvmit.bench.fleet import run as run_fleet

    doc = run_fleet(st.catalog, None if inventory else vms, None if inventory else hosts, cores, inventory, seed,
                    tuple(st.catalogs), progress=lambda m: click.echo(f"bench: {safe_text(m)}", err=True))
    if json_out:
        emit_json(doc)
        return 0 if doc["within_targets"] else 1
    n_vms = f"{doc['vms']:,}" if doc["vms"] is not None else "?"
    n_hosts = f"{doc['hosts']:,}" if doc["hosts"] is not None else "?"
    out.print(f"fleet plan of {n_vms} VMs over {n_hosts} hosts, end to end on {doc['cores']} cores "
              f"(CPUs {doc['cpus']}), Parquet inventory of {doc['inventory_bytes'] / 2**20:.1f} MiB")
    out.print(f"  seconds:   {doc['seconds']:7.2f} s    target < {doc['target_seconds']:.0f} s    "
              f"ratio {doc['seconds_ratio']:.3f}")
    out.print(f"  CPU time:  {doc['cpu_seconds']:7.2f} s    (user + system; load average "
              f"{doc['load_average_before'][0]:.2f} before, {doc['load_average'][0]:.2f} after, on this machine)")
    out.print(f"  peak RSS:  {doc['peak_rss_bytes'] / 2**20:7.0f} MiB  target < "
              f"{doc['target_rss_bytes'] / 2**20:.0f} MiB  ratio {doc['rss_ratio']:.3f}")
    if doc["exit_status"] != 0:
        out.print(f"[red]the planner exited with status {doc['exit_status']}[/]")
    out.print("[green]within targets[/]" if doc["within_targets"] else "[red]target missed[/]")
    return 0 if doc["within_targets"] else 1
