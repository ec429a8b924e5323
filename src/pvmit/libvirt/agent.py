"""Reading a guest's own vulnerability lines through the QEMU guest agent, and what its kernel relies on.

The agent (qemu-ga in the guest, reached through libvirt's virDomainQemuAgentCommand) reads files for us with
guest-file-open / guest-file-read / guest-file-close (QEMU qga/qapi-schema.json). pvmit reads the kernel's
/sys/devices/system/cpu/vulnerabilities/* lines and /proc/cmdline, then decides what the kernel relies on with the
same function pvmit's own in-guest agent uses (`pvmit.agent.decide.decide`). Whatever cannot be read is recorded
as unknown with the reason. Pure apart from `send`, the one call that reaches the guest.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pvmit.agent.decide import decide
from pvmit.derive import Mitigation
from pvmit.userfiles import FileError, load_json

VULN_DIR = "/sys/devices/system/cpu/vulnerabilities"
VULNERABILITIES = ("gather_data_sampling", "indirect_target_selection", "itlb_multihit", "l1tf", "mds", "meltdown",
                   "mmio_stale_data", "old_microcode", "reg_file_data_sampling", "retbleed", "spec_rstack_overflow",
                   "spec_store_bypass", "spectre_v1", "spectre_v2", "srbds", "tsa", "tsx_async_abort", "vmscape")
"""The files Linux may have there (Documentation/ABI/testing/sysfs-devices-system-cpu); an older kernel has fewer.
The agent cannot list a directory, so each is asked for by name."""
READ_LIMIT = 1 << 16
"""A sysfs line or /proc/cmdline is far shorter; reading stops here whatever the agent sends."""

Send = Callable[[str], str]
"""One agent command (JSON text) -> its reply (JSON text); raises AgentError when the agent does not answer."""


class AgentError(Exception):
    """The guest agent did not answer, or answered with an error; the message says which."""


def _call(send: Send, execute: str, **arguments: Any) -> Any:
    reply_text = send(json.dumps({"execute": execute, "arguments": arguments}))
    try:
        reply = load_json(reply_text, f"{execute}: the agent's reply")
    except FileError:
        raise AgentError(f"{execute}: the agent's reply is not JSON: {reply_text[:80]!r}") from None
    if not isinstance(reply, dict):
        raise AgentError(f"{execute}: the agent's reply is not a JSON object")
    if "error" in reply:
        err = reply["error"]
        desc = err.get("desc") if isinstance(err, dict) else err
        raise AgentError(f"{execute}: {desc}")
    if "return" not in reply:
        raise AgentError(f"{execute}: the agent's reply has no 'return'")
    return reply["return"]


def read_file(send: Send, path: str, limit: int = READ_LIMIT) -> str:
    """A text file of the guest, through the agent (at most `limit` bytes, decoded as UTF-8 with replacement)."""
    handle = _call(send, "guest-file-open", path=path, mode="r")
    if not isinstance(handle, int) or isinstance(handle, bool):
        raise AgentError(f"guest-file-open {path}: the handle {handle!r} is not an integer")
    data = b""
    try:
        while len(data) < limit:
            got = _call(send, "guest-file-read", handle=handle, count=min(4096, limit - len(data)))
            if not isinstance(got, dict) or not isinstance(got.get("buf-b64", ""), str):
                raise AgentError(f"guest-file-read {path}: unexpected reply {str(got)[:80]!r}")
            try:
                chunk = base64.b64decode(got.get("buf-b64", ""), validate=True)
            except ValueError:
                raise AgentError(f"guest-file-read {path}: buf-b64 is not base64") from None
            data += chunk
            if got.get("eof") or not chunk:
                break
    finally:
        try:
            _call(send, "guest-file-close", handle=handle)
        except AgentError:
            pass  # the read's own result (or error) is what matters
    return data[:limit].decode("utf-8", "replace")


@dataclass
class GuestLines:
    """What the agent let pvmit read: each vulnerability line (absent files left out), the command line, and why
    anything else could not be read."""

    vulnerabilities: dict[str, str] = field(default_factory=dict)
    cmdline: str | None = None
    unreadable: dict[str, str] = field(default_factory=dict)  # file -> reason
    error: str | None = None  # the agent did not answer at all

    def to_json(self) -> dict[str, object]:
        return {"vulnerabilities": self.vulnerabilities, "cmdline": self.cmdline, "unreadable": self.unreadable,
                "error": self.error}


def _missing(reason: str) -> bool:
    return "No such file" in reason or "ENOENT" in reason or "not found" in reason.lower()


def read_guest(send: Send) -> GuestLines:
    """Every vulnerability line and /proc/cmdline the agent can read. Never raises for the guest's sake."""
    out = GuestLines()
    try:
        _call(send, "guest-ping")
    except AgentError as e:
        out.error = str(e)
        return out
    for name in VULNERABILITIES:
        try:
            out.vulnerabilities[name] = read_file(send, f"{VULN_DIR}/{name}").strip()
        except AgentError as e:
            if not _missing(str(e)):
                out.unreadable[name] = str(e)
    try:
        out.cmdline = read_file(send, "/proc/cmdline").strip()
    except AgentError as e:
        out.unreadable["cmdline"] = str(e)
    return out


@dataclass(frozen=True)
class Reliance:
    """What the guest's kernel relies on (None: unknown, with `why`)."""

    relies_on: frozenset[Mitigation] | None
    why: tuple[str, ...]
    assumed: tuple[str, ...] = ()


def reliance(lines: GuestLines) -> Reliance:
    """What the kernel relies on, from its spectre_v2 line and command line, by pvmit's in-guest agent's rule."""
    if lines.error is not None:
        return Reliance(None, (f"guest agent: {lines.error}",))
    line = lines.vulnerabilities.get("spectre_v2")
    if line is None:
        why = lines.unreadable.get("spectre_v2") or f"{VULN_DIR}/spectre_v2 does not exist in the guest"
        return Reliance(None, (f"spectre_v2 line not read: {why}",))
    r = decide(line, lines.cmdline or "")
    relied = frozenset(Mitigation(n) for n in r.relies_on)
    return Reliance(relied, r.reasons, r.assumed)
