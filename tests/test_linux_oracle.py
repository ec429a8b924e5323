"""pvmit's model of Linux's spectre_v2/BHI choice against lines Linux really printed on identified CPUs.

The observations (tests/fixtures/spectre_v2_observed.toml) carry their addresses. Each is either expected to
agree with `pvmit.linux.model.predict` for the catalog model that stands for that CPU, or marked as a known
disagreement with the reason (microcode, SEV-SNP host) - and then it must really disagree, so that a fix to the
model or the data shows up here.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from pvmit.catalog.facts import RegisterFacts
from pvmit.catalog.loader import Catalog
from pvmit.linux.kernel import CURRENT, Kernel, KernelVersion
from pvmit.linux.model import predict
from pvmit.linux.spectre_v2 import parse_spectre_v2

OBS = tomllib.loads((Path(__file__).parent / "fixtures" / "spectre_v2_observed.toml").read_text())["obs"]


def as_sysfs(line: str, printer: str) -> str:
    """Undo lscpu's and inxi's rewriting of the sysfs text (enough for the mode and the BHI field)."""
    if printer == "inxi":
        line = re.sub(r"^Type: spectre_v2 (mitigation|status): ", lambda m: "Mitigation: " if m[1] == "mitigation"
                      else "", line)
    elif printer == "lscpu":
        line = re.sub(r"^Mitigation; ", "Mitigation: ", line)
        line = re.sub(r"BHI (SW loop), KVM (SW loop)", r"BHI: \1, KVM: \2", line)
        line = re.sub(r"BHI (BHI_DIS_S|Not affected|Retpoline|Vulnerable)$", r"BHI: \1", line)
    return line


def test_the_oracle_is_broad() -> None:
    models = {o["model"] for o in OBS}
    assert len(models) >= 12 and len(OBS) >= 20
    assert sum(o["expect"] == "agree" for o in OBS) >= 20
    assert sum("kernel_version" in o for o in OBS) >= 8


@pytest.mark.parametrize("obs", OBS, ids=[f"{o['model']}:{o['cpu'][:28]}" for o in OBS])
def test_prediction_matches_what_linux_printed(catalog: Catalog, obs: dict) -> None:  # type: ignore[type-arg]
    facts = catalog.get(obs["model"]).facts
    for key, value in obs.get("shown", {}).items():  # what a hypervisor showed its guest beyond the catalog
        reg_key, bit = key.split(".")
        rf = facts.reg(reg_key)
        mask = rf.register.bit(bit)
        regs = dict(facts.registers)
        regs[reg_key] = RegisterFacts(rf.register, (rf.value & ~mask) | (mask if value else 0), rf.known | mask,
                                      {**rf.sources, bit: "observation"})
        facts = replace(facts, registers=regs)
    seen = parse_spectre_v2(as_sysfs(obs["line"], obs["printer"]))
    assert seen.mode is not None, f"could not parse {obs['line']!r}"
    kernel = Kernel(KernelVersion.parse(obs["kernel_version"])) if "kernel_version" in obs else CURRENT
    p = predict(facts, hypervisor=obs["where"] == "guest", kernel=kernel, sev_snp=obs.get("sev_snp", False))
    agrees = (p.mode, p.bhi) == (seen.mode, seen.bhi)
    if obs["expect"] == "agree":
        assert agrees, f"{obs['cpu']}: Linux printed {seen.mode} / {seen.bhi}, pvmit predicts {p.mode} / {p.bhi}"
    else:
        assert obs["expect"].startswith("disagree: ")
        assert not agrees, f"{obs['cpu']} is marked as a known disagreement but now agrees: update the fixture"
