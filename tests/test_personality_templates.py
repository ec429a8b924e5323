"""Personality templates: [registers] gives whole registers as the guest sees them; a template without a catalog
base describes a CPU the catalog lacks."""

from __future__ import annotations

import pytest

from pvmit.catalog.loader import Catalog
from pvmit.errors import InputError
from pvmit.linux.model import predict
from pvmit.linux.spectre_v2 import Bhi, V2Mode
from pvmit.vmm.personality import load_template, resolve


def test_registers_replace_the_base_facts(catalog: Catalog) -> None:
    t = load_template(catalog, "t.toml", 'name = "t"\nbase = "cascadelake-sp"\n[registers]\n'
                                         "cpuid_7_0_edx = 0x0\narch_capabilities = 0x0\n")
    assert catalog.get("cascadelake-sp").facts.fact("arch_capabilities", "IBRS_ALL").value is True
    assert t.facts.fact("arch_capabilities", "IBRS_ALL").value is False  # known, and clear
    assert t.facts.reg("cpuid_7_0_edx").known == 0xFFFF_FFFF
    assert predict(t.facts).mode is V2Mode.RETPOLINE  # no eIBRS shown any more


def test_a_cpu_outside_the_catalog(catalog: Catalog) -> None:
    p = resolve(catalog, "qemu-tcg-qemu64")
    assert (p.facts.vendor, p.facts.family, p.facts.model, p.facts.stepping) == ("amd", 15, 107, 1)
    assert (predict(p.facts).mode, predict(p.facts).bhi) == (V2Mode.RETPOLINE, Bhi.NOT_AFFECTED)


@pytest.mark.parametrize(("text", "message"), [
    ('name = "t"\n', "give 'base'"),
    ('name = "t"\nvendor = "amd"\nfamily = 15\n', "give 'base'"),
    ('name = "t"\nbase = 3\n', "'base' must be a string"),
    ('name = "t"\nbase = "skylake-sp"\n[registers]\nspec_ctrl = 0\n', "registers.spec_ctrl: unknown register"),
    ('name = "t"\nbase = "skylake-sp"\n[registers]\ncpuid_7_2_edx = 0x100000000\n', "unsigned 32-bit"),
    ('name = "t"\nbase = "skylake-sp"\n[registers]\ncpuid_7_2_edx = true\n', "unsigned 32-bit"),
    ('name = "t"\nbase = "skylake-sp"\nregisters = 1\n', "[registers] must be a table"),
])
def test_template_errors_name_the_field(catalog: Catalog, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_template(catalog, "t.toml", text)
