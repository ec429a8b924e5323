"""The migration hook's settings: one TOML file, read on every migration to this host (docs/libvirt.md).

    host_cpu = "inspect"          # this host's CPU: "inspect" (read it, as `pvmit host` does), a catalog model,
                                  # or a JSON file of facts (`pvmit host --json` output; relative to this file),
                                  # as an inventory's cpu cell
    on_unknown = "refuse"         # what to do when the hook cannot decide (an unknown CPU model, a host-passthrough
                                  # guest with nothing recorded, missing facts, any error): refuse or allow
    mode = "enforce"              # enforce, or warn: decide and log, but allow every migration
    passthrough = "unknown"       # a host-passthrough guest was shown its source host's CPU, which its XML does
                                  # not describe: "unknown" (on_unknown decides), or "this-host": take it as this
                                  # host's (for clusters whose hosts have one CPU)
    hypervisor_forces = false     # true only where the hypervisor forces IA32_SPEC_CTRL controls for its guests;
                                  # stock QEMU/KVM does not, so a guest that would be safe only with a control
                                  # forced is not protected there and is refused
    log = "/var/log/pvmit/libvirt-hook.log"   # one JSON line per decision ("" for none)
    catalogs = []                 # operator catalog files, as `pvmit --catalog`
    cpu_map = "/usr/share/libvirt/cpu_map"
    [settings]                    # operator settings for every VM arriving here, as an inventory's host row
    force_on = ""
    force_off = ""
    unreported = "assume-worst"   # or trust

Every value is checked; `ConfigError` names the file and the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pvmit.errors import InputError
from pvmit.fleet.inventory import SETTINGS_COLUMNS, parse_bits, parse_unreported
from pvmit.libvirt.cpumap import DEFAULT_DIR
from pvmit.userfiles import FileError, load_toml, read_text

DEFAULT_PATH = Path("/etc/pvmit/libvirt-hook.toml")
DEFAULT_LOG = "/var/log/pvmit/libvirt-hook.log"
INSPECT = "inspect"


class ConfigError(InputError):
    """The hook's settings file is wrong; the message names the file and the key."""


@dataclass(frozen=True)
class HookConfig:
    host_cpu: str = INSPECT
    on_unknown: Literal["refuse", "allow"] = "refuse"
    mode: Literal["enforce", "warn"] = "enforce"
    passthrough: Literal["unknown", "this-host"] = "unknown"
    hypervisor_forces: bool = False
    log: str = DEFAULT_LOG
    catalogs: tuple[str, ...] = ()
    cpu_map: str = str(DEFAULT_DIR)
    settings: dict[str, str] = field(default_factory=dict)  # inventory setting columns for the host row
    origin: str = "built-in defaults"

    def to_json(self) -> dict[str, object]:
        return {"file": self.origin, "host_cpu": self.host_cpu, "on_unknown": self.on_unknown, "mode": self.mode,
                "passthrough": self.passthrough, "hypervisor_forces": self.hypervisor_forces, "log": self.log,
                "catalogs": list(self.catalogs), "cpu_map": self.cpu_map, "settings": dict(self.settings)}


KEYS = {"host_cpu", "on_unknown", "mode", "passthrough", "hypervisor_forces", "log", "catalogs", "cpu_map",
        "settings"}


def parse_config(doc: dict[str, Any], where: str) -> HookConfig:
    unknown = set(doc) - KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; keys are {', '.join(sorted(KEYS))}")

    def string(key: str, default: str, allowed: tuple[str, ...] = ()) -> str:
        v = doc.get(key, default)
        if not isinstance(v, str) or (allowed and v not in allowed):
            want = " or ".join(repr(a) for a in allowed) if allowed else "a string"
            raise ConfigError(f"{where}: {key} must be {want}, not {v!r}")
        return v

    host_cpu = string("host_cpu", INSPECT).strip()
    if not host_cpu:
        raise ConfigError(f"{where}: host_cpu is empty; give 'inspect', a catalog model or a facts file")
    forces = doc.get("hypervisor_forces", False)
    if not isinstance(forces, bool):
        raise ConfigError(f"{where}: hypervisor_forces must be true or false, not {forces!r}")
    catalogs = doc.get("catalogs", [])
    if not isinstance(catalogs, list) or not all(isinstance(c, str) for c in catalogs):
        raise ConfigError(f"{where}: catalogs must be a list of file names")
    raw_settings = doc.get("settings", {})
    if not isinstance(raw_settings, dict):
        raise ConfigError(f"{where}: [settings] must be a table")
    settings: dict[str, str] = {}
    for key, value in raw_settings.items():
        if key not in SETTINGS_COLUMNS:
            raise ConfigError(f"{where}: settings.{key}: not one of {', '.join(SETTINGS_COLUMNS)}")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: settings.{key} must be a string")
        if not value.strip():
            continue
        try:
            (parse_unreported if key == "unreported" else parse_bits)(value)
        except ValueError as e:
            raise ConfigError(f"{where}: settings.{key}: {e}") from None
        settings[key] = value.strip()
    return HookConfig(host_cpu, string("on_unknown", "refuse", ("refuse", "allow")),  # type: ignore[arg-type]
                      string("mode", "enforce", ("enforce", "warn")),  # type: ignore[arg-type]
                      string("passthrough", "unknown", ("unknown", "this-host")), forces,  # type: ignore[arg-type]
                      string("log", DEFAULT_LOG), tuple(catalogs), string("cpu_map", str(DEFAULT_DIR)), settings,
                      where)


CAP = 1 << 20
"""The settings file is a few hundred bytes; more is refused."""


def load_config(path: Path) -> HookConfig:
    """The settings in `path`; the built-in defaults where the file does not exist."""
    if not os.path.lexists(path):
        return HookConfig(origin=f"built-in defaults ({path} does not exist)")
    try:
        doc = load_toml(read_text(path, "hook settings", CAP), str(path))
    except FileError as e:
        raise ConfigError(str(e)) from None
    return parse_config(doc, str(path))


def render_config(c: HookConfig) -> str:
    """The settings file `pvmit libvirt hook install` writes: every key, each explained."""
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    settings = "\n".join(f"{k} = {q(v)}" for k, v in c.settings.items()) or \
        '# force_on = "RRSBA_DIS_S"\n# force_off = ""\n# unreported = "assume-worst"'
    return f"""# pvmit's libvirt migration hook: read on every migration to this host. See docs/libvirt.md.

# This host's CPU: "inspect" reads it as `pvmit host` does; or a catalog model (`pvmit catalog list`); or a JSON
# file of CPU facts (`pvmit host --json > FILE`), as the cpu column of a fleet inventory.
host_cpu = {q(c.host_cpu)}

# When the hook cannot decide (a CPU model pvmit cannot resolve, a host-passthrough guest with nothing recorded,
# this host's CPU unreadable, a malformed record, any error): "refuse" (the default) or "allow". Logged either way.
on_unknown = {q(c.on_unknown)}

# "enforce" refuses unsafe migrations; "warn" decides and logs the same, but allows every migration.
mode = {q(c.mode)}

# A host-passthrough guest was shown its source host's CPU, which its XML does not describe: "unknown" leaves it to
# on_unknown; "this-host" takes it as this host's CPU (only where every host a guest may come from has this CPU).
passthrough = {q(c.passthrough)}

# true only where this host's hypervisor forces IA32_SPEC_CTRL controls for guests (pvmit's VMM does; stock
# QEMU/KVM does not). With false, a guest that would be safe only with a control forced is refused.
hypervisor_forces = {str(c.hypervisor_forces).lower()}

# One JSON line per decision; "" for none. The decision is also on the hook's stderr, which libvirt shows.
log = {q(c.log)}

catalogs = [{", ".join(q(x) for x in c.catalogs)}]
cpu_map = {q(c.cpu_map)}

# Operator settings for every VM arriving here (as a fleet inventory's host row): they go over the VM's own.
[settings]
{settings}
"""
