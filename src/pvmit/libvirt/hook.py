"""The migration hook libvirt runs: `python3 -m pvmit.libvirt.hook [--config FILE] DOMAIN OPERATION SUB-OPERATION
EXTRA`, with the domain's XML on stdin (libvirt's hooks: /etc/libvirt/hooks/qemu.d/*).

libvirt calls it on the destination before an incoming migration as `DOMAIN migrate begin -`; a non-zero exit
refuses the migration, and libvirt shows the operator what the hook wrote on stderr. Every other call is answered
with 0 at once. Nothing is written on stdout: libvirt would take it as a replacement for the domain's XML.

The hook may not call back into libvirt (libvirt waits for it: docs/hooks.html), so everything comes from the XML
it is given and from this host: its CPU (`host_cpu` in the settings), libvirt's CPU map files, pvmit's catalog.
Each decision is one JSON line in the log, and the verdict comes from `verdict.judge`. Whatever goes wrong, the
answer is the `on_unknown` setting (refuse by default), logged with the reason; a traceback is never shown.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from pathlib import Path
from typing import Any, TextIO

from pvmit.libvirt.config import DEFAULT_PATH, INSPECT, HookConfig, load_config

MAX_STDIN = 16 << 20


def host_cpu(config: HookConfig, catalog: Any) -> tuple[str | dict[str, Any] | None, str]:
    """This host's CPU as an inventory cell, and how it was obtained (or why it could not be)."""
    if config.host_cpu != INSPECT:
        spec = config.host_cpu
        if spec.lower().endswith(".json") and not Path(spec).is_absolute():
            spec = str(Path(config.origin).parent / spec)  # a facts file next to the settings
        return spec, f"host_cpu = {config.host_cpu!r} ({config.origin})"
    from pvmit.host.inspect import inspect_host

    report = inspect_host(catalog, with_kvm=False)
    if report.facts is None:
        why = "; ".join(f"{u['what']}: {u['reason']}" for u in report.unknowns) or "CPUID could not be read"
        return None, f"read on this host (host_cpu = inspect), but: {why}"
    return report.facts.to_json(), "read on this host as `pvmit host` reads it (host_cpu = inspect)"


def decide(args: list[str], stdin: str, config_path: Path, now: str) -> tuple[int, str, str | None, str]:
    """(exit status, message for stderr, log line or None, log file) for one hook call. Never raises."""
    from pvmit.libvirt.verdict import Answer, log_line

    if len(args) < 3 or args[1:3] != ["migrate", "begin"]:
        return 0, "", None, ""
    name = args[0]
    config = HookConfig()
    try:
        config = load_config(config_path)
        from pvmit.catalog.loader import load_catalog
        from pvmit.libvirt.cpumap import FileCpuMap
        from pvmit.libvirt.verdict import judge

        catalog = load_catalog(config.catalogs)
        cpu, how = host_cpu(config, catalog)
        answer = judge(stdin, socket.gethostname(), cpu, how, FileCpuMap(Path(config.cpu_map)), catalog, config)
    except Exception as e:  # noqa: BLE001 - any failure is decided by on_unknown, never a traceback
        why = f"{type(e).__name__}: {e}" if not str(e).startswith(str(config_path)) else str(e)
        allowed = config.on_unknown == "allow" or config.mode == "warn"
        answer = Answer(allowed, "unknown", (f"the hook failed: {why}",),
                        decided_by=f"on_unknown = {config.on_unknown}", vm={"name": name})
    line = log_line(answer, name, now, {"config": config.origin})
    return (0 if answer.allowed else 1), answer.message(name), line, config.log


def append_log(path: str, line: str, err: TextIO) -> None:
    if not path:
        return
    try:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        err.write(f"pvmit: cannot write the hook's log {path}: {e.strerror or e}\n")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    config_path = Path(os.environ.get("PVMIT_LIBVIRT_HOOK_CONFIG") or DEFAULT_PATH)
    if args[:1] == ["--config"] and len(args) >= 2:
        config_path, args = Path(args[1]), args[2:]
    if len(args) < 3 or args[1:3] != ["migrate", "begin"]:
        return 0  # every other operation: nothing to decide
    stdin = sys.stdin.read(MAX_STDIN + 1)
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    status, message, line, log = decide(args, stdin, config_path, now)
    if message:
        sys.stderr.write(message + "\n")
    if line is not None:
        append_log(log, line, sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
