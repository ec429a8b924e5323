"""`pvmit libvirt hook install`: the hook script in libvirt's qemu.d directory, and its settings file.

The script is a few lines of sh that pass every call but `migrate begin` at once (libvirt runs its hooks on every
start, stop and reconnect of every domain) and hand that one to this Python installation's pvmit. The settings file
is written only where none exists (or with --force): an operator's settings are never overwritten unasked.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from pvmit.errors import InputError
from pvmit.libvirt.config import DEFAULT_PATH, HookConfig, render_config

HOOK_DIR = Path("/etc/libvirt/hooks/qemu.d")
HOOK_NAME = "pvmit"


def hook_script(python: str, config: Path) -> str:
    return f"""#!/bin/sh
# pvmit's libvirt migration hook, installed by `pvmit libvirt hook install` (docs/libvirt.md).
# libvirt runs every script here as: DOMAIN OPERATION SUB-OPERATION EXTRA, with the domain's XML on stdin. Only
# "migrate begin" (on the destination, before an incoming migration) is decided; a non-zero exit refuses it and
# libvirt shows what was written on stderr. Nothing may go to stdout (libvirt would take it as new domain XML).
[ "$2" = migrate ] && [ "$3" = begin ] || exit 0
exec {shlex.quote(python)} -I -m pvmit.libvirt.hook --config {shlex.quote(str(config))} "$@" >&2
"""


@dataclass(frozen=True)
class Installed:
    script: Path
    config: Path
    config_written: bool

    def to_json(self) -> dict[str, object]:
        return {"script": str(self.script), "config": str(self.config), "config_written": self.config_written}


def _under(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def install(root: Path, config: HookConfig, *, config_path: Path = DEFAULT_PATH, python: str | None = None,
            force: bool = False) -> Installed:
    """Write the hook and (unless one exists and not `force`) its settings under `root` ('/' for this system).
    `config_path` is where the hook reads its settings, as the installed system sees it."""
    python = python or sys.executable
    if not Path(python).is_absolute():
        raise InputError(f"--python {python!r} must be an absolute path: libvirt runs hooks with a minimal PATH")
    if not config_path.is_absolute():
        raise InputError(f"--config {str(config_path)!r} must be an absolute path")
    script, cfg = _under(root, HOOK_DIR / HOOK_NAME), _under(root, config_path)
    try:
        script.parent.mkdir(parents=True, exist_ok=True)
        tmp = script.with_name(f".{HOOK_NAME}.tmp")
        tmp.write_text(hook_script(python, config_path), encoding="utf-8")
        os.chmod(tmp, 0o755)
        tmp.replace(script)  # atomic: libvirt never runs half a script
        written = False
        if force or not cfg.exists():
            cfg.parent.mkdir(parents=True, exist_ok=True)
            tmp_cfg = cfg.with_name(f".{cfg.name}.tmp")
            tmp_cfg.write_text(render_config(config), encoding="utf-8")
            tmp_cfg.replace(cfg)
            written = True
    except OSError as e:
        raise InputError(f"{e.filename or root}: cannot install the hook: {e.strerror or e}") from None
    return Installed(script, cfg, written)
