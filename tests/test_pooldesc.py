"""The pool description's encoding and rules at their edges (pvmit.interface.pooldesc): CPUID.(1).EAX signatures,
what an entry may hold, the reserved bits a guest refuses, entries read from a peer's JSON, how hosts merge into
entries, and why a host outside the description cannot take a VM. test_bhi.py and test_bhi_properties.py cover
the round trips and the agent's copy of the decoder; these pin the boundaries and the words."""

from __future__ import annotations

import dataclasses
import re

import pytest

from pvmit.catalog.loader import Catalog
from pvmit.interface.pooldesc import (
    MAX_ENTRIES,
    Implementation,
    describe,
    describe_facts,
    not_listed_reasons,
    signature,
)


def test_signatures_are_cpuid_1_eax() -> None:
    """SDM vol. 2A, CPUID leaf 1: extended family only from family 0xF, extended model only from family 6."""
    assert signature(6, 0x8F, 8) == 0x806F8  # Sapphire Rapids E-0
    assert signature(6, 0x55, 7) == 0x50657  # Cascade Lake
    assert signature(5, 4, 3) == 0x543  # a Pentium MMX: neither extension
    assert signature(0xF, 2, 9) == 0xF29  # a Pentium 4: family 0xF itself has no extended family
    assert signature(0x19, 0x11, 1) == 0xA10F11  # EPYC Genoa
    assert signature(0x10E, 0xFF, 15) == 0x0FFF0FFF  # the largest family and model


def test_what_an_entry_may_hold() -> None:
    Implementation("intel", 0xF + 0xFF, 0xFF, 0, 15)  # the edges fit
    Implementation("amd", 5, 0xF, 3, 3)
    errors = [
        (("via", 6, 1), "vendor 'via' is not one of intel, amd, hygon"),
        (("intel", 0x10F, 1), "family 0x10f does not fit CPUID.(1).EAX"),
        (("intel", -1, 1), "family -0x1 does not fit CPUID.(1).EAX"),
        (("intel", 6, 0x100), "model 0x100 does not fit CPUID.(1).EAX for family 0x6"),
        (("intel", 5, 0x10), "model 0x10 does not fit CPUID.(1).EAX for family 0x5"),
        (("intel", 6, 1, 0, 16), "steppings 0..16 are not a range within 0..15"),
        (("intel", 6, 1, -1, 3), "steppings -1..3 are not a range within 0..15"),
    ]
    for args, message in errors:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            Implementation(*args)  # type: ignore[arg-type]


def test_a_guest_refuses_values_no_vmm_writes() -> None:
    good = Implementation("intel", 6, 0x8F, 5, 8).encode()
    assert good == 0x806F5 | 8 << 32 | 1 << 40 and Implementation.decode(good) == Implementation("intel", 6, 0x8F, 5, 8)
    for bit in (12, 15, 28, 31, 36, 39, 44, 63):  # reserved: CPUID.1.EAX 15:12 and 31:28, 39:36, 63:44
        with pytest.raises(ValueError, match=f"^pool entry {good | 1 << bit:#x}: reserved bits set$"):
            Implementation.decode(good | 1 << bit)
    for code in (0, 4, 15):
        value = good & ~(0xF << 40) | code << 40
        with pytest.raises(ValueError, match=f"^pool entry {value:#x}: unknown vendor code {code}$"):
            Implementation.decode(value)


def test_entries_read_from_json() -> None:
    e = Implementation("hygon", 0x18, 0, 1, 2)
    assert e.to_json() == {"vendor": "hygon", "family": 0x18, "model": 0, "stepping_min": 1, "stepping_max": 2,
                           "value": "0x30200900f01"}
    assert Implementation.from_json(e.to_json()) == e
    fields = {"vendor": "intel", "family": 6, "model": 0x55, "stepping_min": 0, "stepping_max": 15}
    for doc, message in (([], "a pool entry must be an object"),
                         ({k: v for k, v in fields.items() if k != "model"}, "a pool entry has no 'model'"),
                         ({**fields, "stepping_max": True}, "a pool entry's family, model and steppings must be "
                                                            "integers"),
                         ({**fields, "family": "6"}, "a pool entry's family, model and steppings must be integers"),
                         ({**fields, "vendor": None}, "vendor 'None' is not one of intel, amd, hygon")):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            Implementation.from_json(doc)


def test_hosts_merge_into_one_entry_per_model() -> None:
    assert describe([("intel", 6, (0x55,), (6, 7)), ("intel", 6, (0x55,), (8, 9)), ("intel", 6, (0x55,), (7,))]) \
        == (Implementation("intel", 6, 0x55, 6, 9),), "the lowest to the highest stepping of every host"
    assert describe([("intel", 6, (0x55,), (3,)), ("intel", 6, (0x55,), (1,))]) == (
        Implementation("intel", 6, 0x55, 1, 3),)
    full = describe([("intel", 6, tuple(range(MAX_ENTRIES)), ())])
    assert len(full) == MAX_ENTRIES and all((e.stepping_min, e.stepping_max) == (0, 15) for e in full)
    with pytest.raises(ValueError, match=f"^the pool has 33 CPU implementations; a pool description holds at most "
                                         f"{MAX_ENTRIES}$"):
        describe([("intel", 6, tuple(range(MAX_ENTRIES + 1)), ())])


def test_host_facts_with_and_without_a_stepping(catalog: Catalog) -> None:
    spr = catalog.get("sapphirerapids").facts
    known = dataclasses.replace(spr, stepping=8)
    assert describe_facts([known]) == (Implementation("intel", 6, 0x8F, 8, 8),)
    assert describe_facts([dataclasses.replace(spr, stepping=None)]) == (Implementation("intel", 6, 0x8F, 0, 15),)
    assert describe_facts([known, dataclasses.replace(spr, stepping=5)]) == (Implementation("intel", 6, 0x8F, 5, 8),)


def test_why_a_host_outside_the_description_cannot_take_the_vm(catalog: Catalog) -> None:
    icx = catalog.get("icelake-sp").facts
    pool = (Implementation("intel", 6, 0x6A, 4, 6), Implementation("intel", 6, 0x8F, 8, 8))
    tail = ("is not among them: a guest that chose its mitigations for the listed CPUs may be unmitigated here",)
    listed = "intel family 0x6 model 0x6a steppings 4-6; intel family 0x6 model 0x8f stepping 8"
    spr = catalog.get("sapphirerapids").facts
    assert not_listed_reasons(pool, dataclasses.replace(spr, stepping=8)) == ()
    assert not_listed_reasons(None, spr) == ()
    assert not_listed_reasons(pool, dataclasses.replace(spr, stepping=7)) == (
        f"the VM was told at boot it may run on {listed}; this host (intel family 0x6 model 0x8f stepping 7) "
        + tail[0],)
    assert not_listed_reasons(pool, dataclasses.replace(spr, stepping=None)) == (
        f"the VM was told at boot it may run on {listed}; this host (intel family 0x6 model 0x8f unknown stepping) "
        + tail[0],)
    assert not_listed_reasons(pool, dataclasses.replace(icx, stepping=5)) == ()
