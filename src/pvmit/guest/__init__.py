"""Guest programs: readable x86-64 assembly kept here, assembled with Keystone when a VM is built."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from pvmit.asm import assemble, package_source

LOAD_ADDRESS = 0x10000
"""Where the VMM loads a guest program; its first byte is the entry point."""


@dataclass(frozen=True)
class Program:
    name: str
    code: bytes
    load_address: int = LOAD_ADDRESS


@cache
def program(name: str) -> Program:
    """Assemble `<name>.s` from this package for LOAD_ADDRESS."""
    source = package_source("pvmit.guest", f"{name}.s")
    return Program(name, assemble(source, LOAD_ADDRESS, name=f"{name}.s"))
