"""The on-disk shape of a catalog file (TOML), validated with pydantic before anything uses it.

A catalog file has a `[sources.KEY]` table per cited document and a `[[cpu]]` array of entries. In an entry, each
register table maps a bit name to `{ value = true|false, source = "KEY: detail" }`; a bit that is not listed is
unknown. See src/pvmit/catalog/data/README.md for the format with an example.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

Ident = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64)]


class SourceIn(BaseModel):
    """A document that facts cite: what it is and where a reviewer can read it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    title: str = Field(min_length=1)
    url: str = ""
    commit: str = ""


class BitFactIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    value: bool
    source: str = Field(min_length=1)
    inferred: bool = False  # the source gives a rule for a class of parts; this applies it to one part
    unverified: bool = False  # no primary source for this part: the guest-protecting value, used only that way


RegisterIn = dict[str, BitFactIn]


class CpuEntryIn(BaseModel):
    """One CPU model as written in a catalog file. Strict: TOML has real booleans and integers, so a string where
    a number belongs is an error, not something to convert."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    id: Ident
    name: str = Field(min_length=1)
    vendor: Literal["intel", "amd", "hygon"]
    family: int = Field(ge=0, le=0x10F)
    model: list[int] = Field(min_length=1)
    steppings: list[int] = Field(default_factory=list)
    microarchitecture: str = Field(min_length=1)
    marketing: list[str] = Field(default_factory=list)
    segment: Literal["server", "client", "embedded"]
    year: int | None = Field(default=None, ge=1995, le=2100)
    qemu: list[str] = Field(default_factory=list)
    aliases: list[str] = Field(default_factory=list)
    identity_source: str = Field(min_length=1)
    notes: str = ""
    arch_capabilities: RegisterIn = Field(default_factory=dict)
    cpuid_7_0_edx: RegisterIn = Field(default_factory=dict)
    cpuid_7_2_edx: RegisterIn = Field(default_factory=dict)
    cpuid_80000008_ebx: RegisterIn = Field(default_factory=dict)
    cpuid_80000021_eax: RegisterIn = Field(default_factory=dict)
    cpuid_80000021_ecx: RegisterIn = Field(default_factory=dict)
    linux_blacklist: RegisterIn = Field(default_factory=dict)  # filled from the identity; bits here override

    @field_validator("model", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, int) else v

    @field_validator("model", "steppings")
    @classmethod
    def _byte_range(cls, v: list[int]) -> list[int]:
        for x in v:
            if not 0 <= x <= 0xFF:
                raise ValueError(f"{x} is outside 0..255")
        return v


