"""x86 facts: bit layouts of the speculation-control registers and lossless decoding of raw values."""

from pvmit.x86 import bits
from pvmit.x86.registers import (
    ARCH_CAPABILITIES,
    CPU_FACT_REGISTERS,
    REGISTERS,
    SPEC_CTRL,
    Decoded,
    Register,
    decode,
    encode,
    register,
)

__all__ = [
    "ARCH_CAPABILITIES", "CPU_FACT_REGISTERS", "REGISTERS", "SPEC_CTRL", "Decoded", "Register", "bits", "decode",
    "encode", "register",
]
