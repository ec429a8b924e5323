"""Guest programs: readable x86-64 assembly kept here, assembled with Keystone when a VM is built."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from pvmit.asm import AsmError, assemble, package_source

LOAD_ADDRESS = 0x10000
"""Where the VMM loads a guest program; its first byte is the entry point."""


@dataclass(frozen=True)
class Program:
    name: str
    code: bytes
    load_address: int = LOAD_ADDRESS


INCLUDE = re.compile(r'^[ \t]*\.include[ \t]+"([\w.-]+\.s)"[ \t]*(;.*)?$', re.MULTILINE)


def source_of(name: str) -> str:
    """The text of `<name>.s` with its `.include "file.s"` lines replaced by those files (one level: the shared
    routines in lib.s include nothing)."""
    text = package_source("pvmit.guest", f"{name}.s")

    def expand(m: re.Match[str]) -> str:
        included = package_source("pvmit.guest", m.group(1))
        if INCLUDE.search(included):
            raise AsmError(f"{m.group(1)}: an included file may not include another")
        return included

    return INCLUDE.sub(expand, text)


@cache
def program(name: str) -> Program:
    """Assemble `<name>.s` from this package for LOAD_ADDRESS."""
    return Program(name, assemble(source_of(name), LOAD_ADDRESS, name=f"{name}.s"))
