"""Assembling x86 source text into machine code with Keystone (a real assembler library, LLVM MC based).

pvmit keeps every piece of machine code it runs as readable assembly in the repository (the host CPUID stub, the
guest programs) and assembles it here at run time; there are no hand-written byte strings.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from pvmit.errors import PvmitError


class AsmError(PvmitError):
    """Source text that does not assemble; the message names the file and statement."""


def _statements(source: str) -> list[str]:
    out = []
    for line in source.splitlines():
        line = line.split(";", 1)[0].strip()
        if line:
            out.append(line)
    return out


def assemble(source: str, address: int = 0, *, name: str = "<asm>", bits: int = 64) -> bytes:
    """Assemble Intel-syntax `source` as if loaded at `address`. Comments start with ";" (not inside strings)."""
    import keystone  # type: ignore[import-untyped]  # only needed when machine code is built

    mode = {16: keystone.KS_MODE_16, 32: keystone.KS_MODE_32, 64: keystone.KS_MODE_64}[bits]
    ks = keystone.Ks(keystone.KS_ARCH_X86, mode)
    stmts = _statements(source)
    try:
        encoding, _ = ks.asm("\n".join(stmts), address)
    except keystone.KsError as e:
        done = e.get_asm_count() if hasattr(e, "get_asm_count") else None
        where = f" near statement {done + 1}: {stmts[done]!r}" if done is not None and done < len(stmts) else ""
        raise AsmError(f"{name}: cannot assemble{where}: {e}") from None
    if not encoding:
        raise AsmError(f"{name}: assembled to nothing")
    return bytes(encoding)


def symbols(source: str) -> list[str]:
    """Labels defined in `source` (a line 'name:'), in order."""
    return [m.group(1) for m in re.finditer(r"^\s*([A-Za-z_.][\w.]*):", source, re.MULTILINE)]


@cache
def package_source(package: str, filename: str) -> str:
    """Read an assembly source file shipped inside a pvmit package."""
    return (resources.files(package) / filename).read_text(encoding="utf-8")
