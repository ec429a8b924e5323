"""The kernel-version axis of pvmit's Linux model: each rule of linux/kernels.toml, on both sides of the release
that brought it, and the wordings each version prints (parsed by the agent)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from pvmit.agent.decide import decide
from pvmit.catalog.facts import CpuFacts, RegisterFacts
from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation
from pvmit.errors import InputError
from pvmit.linux.kernel import LATEST, Kernel, KernelVersion, rules
from pvmit.linux.model import Cmdline, predict
from pvmit.linux.spectre_v2 import Bhi, Its, V2Mode, parse_its, parse_spectre_v2

V = KernelVersion.parse


def k(version: str, kvm: bool = True) -> Kernel:
    return Kernel(V(version), kvm=kvm)


def shown(facts: CpuFacts, **bits: bool) -> CpuFacts:
    """`facts` with register bits set or cleared as a hypervisor would show them (key__BIT=value)."""
    regs = dict(facts.registers)
    for name, value in bits.items():
        key, bit = name.split("__")
        rf = facts.reg(key) if key not in regs else regs[key]
        mask = rf.register.bit(bit)
        regs[key] = RegisterFacts(rf.register, (rf.value & ~mask) | (mask if value else 0), rf.known | mask,
                                  {**rf.sources, bit: "test"})
    return replace(facts, registers=regs)


# --- versions and rules --------------------------------------------------------------------------------------


def test_versions_are_read_from_what_debian_prints() -> None:
    assert V("6.12.117+deb12-amd64") == KernelVersion(6, 12, 117)
    assert V("Linux version 6.1.0-56-amd64 (debian-kernel@lists.debian.org) (gcc-12 ...) #1 SMP PREEMPT_DYNAMIC "
             "Debian 6.1.192-2 (2026-11-16)") == KernelVersion(6, 1, 192)
    # a kernel built elsewhere with Debian's compiler: "Debian 12.2.0" is gcc's, not the kernel's
    assert V("Linux version 6.18.44 (builder@host) (gcc (Debian 12.2.0-14) 12.2.0, GNU ld (GNU Binutils for Debian) "
             "2.40) #1 SMP PREEMPT_DYNAMIC") == KernelVersion(6, 18, 44)
    assert V("6.18") == KernelVersion(6, 18, 0) and V("5.10.0") < V("5.10.1") < V("6.1")
    for bad in ("4.19.311", "7.0.9", "", "linux", "6"):
        with pytest.raises(InputError, match="kernel version"):
            V(bad)
    assert LATEST == KernelVersion(6, 18, 0)


def test_every_rule_is_sourced_and_used() -> None:
    model = (Path(__file__).parents[1] / "src/pvmit/linux/model.py").read_text()
    used = set(re.findall(r'\.has\("([a-z_]+)"\)', model))
    assert used == set(rules()), "every rule in kernels.toml is asked by the model, and only those"
    for r in rules().values():
        assert (5, 10) <= r.since <= (6, 18) and r.source and r.what
        assert r.commits and all(re.fullmatch(r"[0-9a-f]{12}", c.split()[0]) for c in r.commits), r.id
        assert not set(r.stable) & r.unsourced and not set(r.absent) & (set(r.stable) | r.unsourced)


@pytest.mark.parametrize("rule,before,after", [
    ("bhi", "6.1.84", "6.1.85"), ("bhi", "6.6.25", "6.6.26"), ("bhi", "6.8.4", "6.8.5"), ("bhi", "6.8.0", "6.9.0"),
    ("bhi_fixes", "6.1.86", "6.1.87"), ("bhi_fixes", "6.6.27", "6.6.28"),
    ("bhi_retpoline_check", "6.1.87", "6.1.88"), ("autoibrs", "6.1.83", "6.1.84"), ("autoibrs", "6.2.0", "6.3.0"),
    ("its", "6.1.138", "6.1.139"), ("its", "6.6.90", "6.6.91"), ("its", "6.12.28", "6.12.29"),
    ("its_stuff", "6.12.28", "6.12.29"), ("bhi_no_ignored", "6.12.28", "6.12.29"),
    ("bhi_vmexit", "6.10.0", "6.11.0"), ("attack_vectors", "6.16.9", "6.17.0"),
    ("lfence_fields", "6.1.158", "6.1.159"), ("lfence_fields", "6.12.56", "6.12.57"),
    ("lfence_fields", "5.15.196", "5.15.197"), ("retpoline_generic", "5.16.0", "5.17.0"),
    ("kernel_ibrs", "5.18.13", "5.18.14"), ("snp_no_autoibrs", "6.8.0", "6.9.0"),
])
def test_rules_change_at_the_sourced_release(rule: str, before: str, after: str) -> None:
    assert not k(before).has(rule) and k(after).has(rule)


def test_the_oracle_kernels_are_placed() -> None:
    """Debian's 6.1.192 and 6.12.117, as the oracle boots them."""
    assert {r for r in rules() if k("6.1.192").has(r)} == {
        "retpoline_generic", "kernel_ibrs", "autoibrs", "bhi", "bhi_fixes", "bhi_retpoline_check", "its",
        "bhi_no_ignored", "lfence_fields"}
    assert {r for r in rules() if not k("6.12.117").has(r)} == {"attack_vectors"}


def test_a_branch_with_an_unsourced_backport_is_refused_not_guessed(catalog: Catalog) -> None:
    with pytest.raises(InputError, match=r"5\.15\.y branch took '\w+' \([0-9a-f]{12} .*no source"):
        predict(catalog.get("skylake-sp").facts, kernel=k("5.15.150"))
    with pytest.raises(InputError, match="6.6.y branch took 'bhi_vmexit'"):
        predict(catalog.get("skylake-sp").facts, Cmdline.parse("spectre_bhi=vmexit"), kernel=k("6.6.60"))
    # ... but a question the version does not reach is answered: no vmexit option asked, no need to place it
    assert predict(catalog.get("skylake-sp").facts, kernel=k("6.6.60")).bhi is Bhi.SW_LOOP
    assert predict(catalog.get("skylake-sp").facts, kernel=k("5.15.0")).sysfs_mode.startswith("Mitigation: Full")


# --- what each version picks and prints ----------------------------------------------------------------------


def test_spectre_v2_wording_by_version(catalog: Catalog) -> None:
    clx = catalog.get("cascadelake-sp").facts  # eIBRS shown
    assert predict(clx, kernel=k("6.1.83")).sysfs_mode == "Mitigation: Enhanced IBRS"  # before e7862eda309e
    assert predict(clx, kernel=k("6.1.84")).sysfs_mode == "Mitigation: Enhanced / Automatic IBRS"
    assert predict(clx, Cmdline.parse("spectre_v2=eibrs,retpoline"),
                   kernel=k("6.2.0")).sysfs_mode == "Mitigation: Enhanced IBRS + Retpolines"
    # before 5.17 the eibrs,* options did not exist: auto
    old = predict(clx, Cmdline.parse("spectre_v2=eibrs,retpoline"), kernel=k("5.15.0"))
    assert (old.mode, old.sysfs_mode) == (V2Mode.EIBRS, "Mitigation: Enhanced IBRS")
    skx = catalog.get("skylake-sp").facts
    assert predict(skx, kernel=k("5.10.0")).sysfs_mode == "Mitigation: Full generic retpoline"
    assert predict(skx, kernel=k("5.19.0")).mode is V2Mode.IBRS  # Retbleed: kernel IBRS (7c693f54c873)
    assert predict(skx, kernel=k("5.18.13")).mode is V2Mode.RETPOLINE
    assert predict(skx, Cmdline.parse("spectre_v2=ibrs"), kernel=k("5.18.0")).mode is V2Mode.RETPOLINE


def test_amd_retpoline_default_before_5_17(catalog: Catalog) -> None:
    rome = catalog.get("epyc-rome").facts
    old = predict(rome, kernel=k("5.10.0"))
    assert (old.mode, old.sysfs_mode, old.relies_on) == (V2Mode.LFENCE, "Mitigation: Full AMD retpoline",
                                                         frozenset())
    assert predict(rome, kernel=k("5.17.0")).relies_on == {Mitigation.RETPOLINE}


def test_autoibrs_counts_as_eibrs_from_6_3_and_not_on_an_snp_host(catalog: Catalog) -> None:
    genoa = catalog.get("epyc-genoa").facts
    assert predict(genoa, kernel=k("6.2.0")).mode is V2Mode.RETPOLINE
    assert predict(genoa, kernel=k("6.3.0")).mode is V2Mode.EIBRS
    assert predict(genoa, hypervisor=False, sev_snp=True, kernel=k("6.11.0")).mode is V2Mode.RETPOLINE
    assert predict(genoa, hypervisor=False, sev_snp=True, kernel=k("6.8.0")).mode is V2Mode.EIBRS
    assert predict(genoa, hypervisor=True, sev_snp=True, kernel=k("6.11.0")).mode is V2Mode.EIBRS  # guests: no


def test_no_bhi_field_and_no_loop_before_the_bhi_mitigation(catalog: Catalog) -> None:
    clx = catalog.get("cascadelake-sp").facts
    old = predict(clx, kernel=k("6.1.84"))
    assert (old.bhi, old.sysfs_bhi, old.relies_on) == (Bhi.NOT_REPORTED, None, frozenset())
    new = predict(clx, kernel=k("6.1.85"))
    assert new.bhi is Bhi.SW_LOOP and new.relies_on == {Mitigation.BHB_SHORT}


def test_bhi_fixes_rrsba_and_syscall_hardening(catalog: Catalog) -> None:
    spr = catalog.get("sapphirerapids").facts  # RRSBA with RRSBA_CTRL, BHI_CTRL
    retp = Cmdline.parse("spectre_v2=retpoline")
    assert predict(spr, retp, kernel=k("6.1.86")).bhi is Bhi.BHI_DIS_S  # ARCH_CAP_RRSBA alone decided
    assert predict(spr, retp, kernel=k("6.1.87")).bhi is Bhi.RETPOLINE  # RRSBA disabled first (1cea8a280dfd)
    clx = catalog.get("cascadelake-sp").facts
    assert predict(clx, Cmdline.parse("spectre_bhi=auto"), kernel=k("6.1.86")).bhi is Bhi.SYSCALL_HARDENING
    assert predict(clx, Cmdline.parse("spectre_bhi=auto"), kernel=k("6.1.87")).bhi is Bhi.SW_LOOP  # ignored
    assert predict(clx, Cmdline.parse("spectre_bhi=off"), kernel=k("6.1.86")).bhi is \
        Bhi.SYSCALL_HARDENING_VULNERABLE
    assert predict(clx, Cmdline.parse("spectre_bhi=off"), kernel=k("6.1.87")).bhi is Bhi.VULNERABLE


def test_lfence_counts_as_retpoline_until_69129794d94c_and_prints_bare_until_d1cc1baef67a(
        catalog: Catalog) -> None:
    skx = shown(catalog.get("skylake-sp").facts, cpuid_7_0_edx__ARCH_CAPABILITIES=False)
    lfence = Cmdline.parse("spectre_v2=retpoline,lfence")
    p87 = predict(skx, lfence, kernel=k("6.1.87"))
    assert (p87.bhi, p87.sysfs_line, p87.printed_bhi) == (Bhi.RETPOLINE, "Vulnerable: LFENCE", Bhi.NOT_REPORTED)
    p88 = predict(skx, lfence, kernel=k("6.1.88"))
    assert (p88.bhi, p88.sysfs_line) == (Bhi.SW_LOOP, "Vulnerable: LFENCE")
    assert decide(p88.sysfs_line).relies_on == ["bhb-short"]  # the agent assumes the loop: the safe side
    p159 = predict(skx, lfence, kernel=k("6.1.159"))
    assert p159.sysfs_line == "Vulnerable: LFENCE; BHI: SW loop, KVM: SW loop"


def test_spectre_bhi_vmexit_from_6_11(catalog: Catalog) -> None:
    clx = catalog.get("cascadelake-sp").facts
    vmexit = Cmdline.parse("spectre_bhi=vmexit")
    assert predict(clx, vmexit, kernel=k("6.1.192")).bhi is Bhi.SW_LOOP  # ignored: the loop still runs
    assert predict(clx, vmexit, kernel=k("6.12.117")).bhi is Bhi.VMEXIT_ONLY


def test_bhi_no_honoured_until_9f725eec8fc0(catalog: Catalog) -> None:
    cwf = catalog.get("clearwaterforest").facts
    assert predict(cwf, hypervisor=False, kernel=k("6.1.138")).bhi is Bhi.NOT_AFFECTED
    assert predict(cwf, hypervisor=False, kernel=k("6.1.139")).bhi is Bhi.BHI_DIS_S


def test_attack_vectors_and_a_guest_built_without_kvm(catalog: Catalog) -> None:
    """6.17+: BHI is mitigated by default only where the guest->host vector is, which needs CONFIG_KVM: a guest
    kernel without KVM prints 'BHI: Vulnerable' by design (firecracker PR #6013)."""
    clx, spr = catalog.get("cascadelake-sp").facts, catalog.get("sapphirerapids").facts
    for facts in (clx, spr):
        p = predict(facts, kernel=k("6.18.6", kvm=False))
        assert (p.mode, p.bhi, p.sets_bhi_dis_s, p.relies_on) == (V2Mode.EIBRS, Bhi.VULNERABLE, False, frozenset())
        assert predict(facts, kernel=k("6.16.0", kvm=False)).bhi in (Bhi.SW_LOOP, Bhi.BHI_DIS_S)  # no vectors yet
    assert predict(clx, kernel=k("6.18.6")).bhi is Bhi.SW_LOOP
    assert predict(clx, Cmdline.parse("spectre_bhi=on"), kernel=k("6.18.6", kvm=False)).bhi is Bhi.SW_LOOP
    vec = {v: predict(clx, Cmdline.parse(f"mitigations=auto,{v}"), kernel=k("6.17.0"))
           for v in ("no_guest_host", "no_user_kernel")}
    assert vec["no_guest_host"].bhi is Bhi.VULNERABLE and vec["no_user_kernel"].bhi is Bhi.VMEXIT_ONLY
    both = predict(clx, Cmdline.parse("mitigations=auto,no_guest_host,no_user_kernel"), kernel=k("6.17.0"))
    assert (both.mode, both.bhi, both.its) == (V2Mode.NONE, Bhi.VULNERABLE, Its.VULNERABLE)
    # the syntax means nothing to older kernels ("Unsupported mitigations=")
    assert predict(clx, Cmdline.parse("mitigations=auto,no_guest_host"), kernel=k("6.12.117")).bhi is Bhi.SW_LOOP
    # the command line of this development machine (a 6.18.44 guest): the 6.17 syntax in real use
    real = Cmdline.parse("mitigations=auto,no_guest_host,no_guest_guest console=ttyS0 quiet reboot=k panic=1")
    assert real.vectors_off == {"no_guest_host", "no_guest_guest"} and not real.mitigations_off
    assert str(real) == "mitigations=auto,no_guest_guest,no_guest_host"
    with pytest.raises(InputError, match="no_guest_hots"):
        Cmdline.parse("mitigations=auto,no_guest_hots")


def test_its_by_version_and_by_what_the_guest_is_shown(catalog: Catalog) -> None:
    skx = catalog.get("skylake-sp").facts
    assert predict(skx, kernel=k("6.1.138")).its is Its.ABSENT
    p = predict(skx, kernel=k("6.1.139"))
    assert (p.its, p.its.sysfs, p.trusts) == (Its.ALIGNED_THUNKS, "Mitigation: Aligned branch/return thunks", ())
    assert predict(skx, Cmdline.parse("mitigations=off"), kernel=k("6.12.117")).its is Its.VULNERABLE
    assert predict(skx, Cmdline.parse("spectre_v2=off"), kernel=k("6.12.117")).its is Its.VULNERABLE
    assert predict(skx, Cmdline.parse("spectre_v2=retpoline,lfence"), kernel=k("6.12.117")).its is Its.VULNERABLE
    retp = "spectre_v2=retpoline indirect_target_selection=stuff"
    assert predict(skx, Cmdline.parse(retp), kernel=k("6.12.117")).its is Its.RETPOLINE_STUFF
    assert predict(skx, Cmdline.parse(retp), kernel=k("6.1.192")).its is Its.ALIGNED_THUNKS  # no such option
    no = predict(shown(skx, cpuid_7_0_edx__ARCH_CAPABILITIES=True, arch_capabilities__ITS_NO=True),
                 kernel=k("6.12.117"))
    assert (no.its, no.trusts) == (Its.NOT_AFFECTED, ("arch_capabilities.ITS_NO",))
    spr = predict(catalog.get("sapphirerapids").facts, kernel=k("6.12.117"))
    assert (spr.its, spr.trusts) == (Its.NOT_AFFECTED, ("cpuid_7_2_edx.BHI_CTRL",))
    assert predict(catalog.get("epyc-genoa").facts, kernel=k("6.12.117")).its is Its.NOT_AFFECTED
    icx = catalog.get("icelake-sp").facts  # ITS_NATIVE_ONLY on bare metal: vmexit leaves the host unmitigated
    assert predict(icx, Cmdline.parse("indirect_target_selection=vmexit"), hypervisor=False,
                   kernel=k("6.12.117")).its is Its.VMEXIT_ONLY
    assert predict(icx, Cmdline.parse("indirect_target_selection=vmexit"), hypervisor=True,
                   kernel=k("6.12.117")).its is Its.ALIGNED_THUNKS
    assert predict(catalog.get("haswell-ep").facts, hypervisor=False, kernel=k("6.12.117")).its is Its.NOT_AFFECTED


# --- every wording those versions print, parsed (and decided on by the agent) ---------------------------------

LINES = [
    # (line, mode, BHI, where the text comes from)
    ("Mitigation: Full generic retpoline, IBPB: conditional, IBRS_FW, STIBP: disabled, RSB filling",
     V2Mode.RETPOLINE, Bhi.NOT_REPORTED, "5.10: spectre_v2_strings[] with ', ' fields"),
    ("Mitigation: Full AMD retpoline, IBPB: conditional, STIBP: disabled, RSB filling", V2Mode.LFENCE,
     Bhi.NOT_REPORTED, "5.10 on AMD"),
    ("Mitigation: Enhanced IBRS, IBPB: conditional, RSB filling", V2Mode.EIBRS, Bhi.NOT_REPORTED, "before 6.3"),
    ("Mitigation: Enhanced IBRS; IBPB: conditional; RSB filling; PBRSB-eIBRS: SW sequence; BHI: SW loop, KVM: SW "
     "loop", V2Mode.EIBRS, Bhi.SW_LOOP, "constructed: an old head with a BHI field (fields parse independently)"),
    ("Vulnerable: LFENCE", V2Mode.LFENCE, Bhi.NOT_REPORTED, "5.17 to 6.17 (eafd987d4a82 .. d1cc1baef67a)"),
    ("Vulnerable: LFENCE; STIBP: disabled; RSB filling; PBRSB-eIBRS: Not affected; BHI: SW loop, KVM: SW loop",
     V2Mode.LFENCE, Bhi.SW_LOOP, "Debian 6.1.192 and 6.12.117 under QEMU (the oracle)"),
    ("Vulnerable: LFENCE; STIBP: disabled; RSB filling; PBRSB-eIBRS: Not affected; BHI: Vulnerable, KVM: SW loop",
     V2Mode.LFENCE, Bhi.VMEXIT_ONLY, "Debian 6.12.117, spectre_bhi=vmexit (the oracle)"),
    ("Vulnerable; IBPB: disabled; STIBP: disabled; PBRSB-eIBRS: Not affected; BHI: Vulnerable (Syscall hardening "
     "enabled)", V2Mode.NONE, Bhi.SYSCALL_HARDENING_VULNERABLE, "a real dump of a kernel before 5f882f3b0a8b"),
    ("Mitigation: Enhanced / Automatic IBRS; IBPB: conditional; RSB filling; PBRSB-eIBRS: SW sequence; BHI: "
     "Syscall hardening, KVM: SW loop", V2Mode.EIBRS, Bhi.SYSCALL_HARDENING, "spectre_bhi=auto before 36d4fe147c87"),
    ("Mitigation: Enhanced / Automatic IBRS; IBPB: conditional; PBRSB-eIBRS: SW sequence; BHI: Vulnerable",
     V2Mode.EIBRS, Bhi.VULNERABLE, "6.18 built without KVM (attack vectors)"),
    ("Mitigation: Retpolines; STIBP: disabled; RSB filling; PBRSB-eIBRS: Not affected; BHI: SW loop, KVM: SW loop"
     " - vulnerable module loaded", V2Mode.RETPOLINE, Bhi.SW_LOOP, "spectre_v2_module_string() (every version)"),
    ("Mitigation: Retpolines; STIBP: disabled; RSB filling; PBRSB-eIBRS: Not affected; BHI: Retpoline",
     V2Mode.RETPOLINE, Bhi.RETPOLINE, "the oracle, both kernels"),
    ("Mitigation: Retpolines; STIBP: disabled; RSB filling; PBRSB-eIBRS: Not affected; BHI: Not affected",
     V2Mode.RETPOLINE, Bhi.NOT_AFFECTED, "this development machine: a Zen 5 guest on 6.18.44"),
]


@pytest.mark.parametrize("line,mode,bhi,where", LINES, ids=[w[:40] for *_, w in LINES])
def test_every_wording_parses(line: str, mode: V2Mode, bhi: Bhi, where: str) -> None:
    s = parse_spectre_v2(line)
    assert (s.mode, s.bhi) == (mode, bhi), where
    d = decide(line)
    assert ("retpoline" in d.relies_on) == mode.uses_retpoline
    assert ("bhb-short" in d.relies_on) == (bhi is Bhi.SW_LOOP or bhi is Bhi.NOT_REPORTED)
    assert d.assumed == (("bhb-short",) if bhi is Bhi.NOT_REPORTED else ())


@pytest.mark.parametrize("text,its", [
    ("Not affected", Its.NOT_AFFECTED), ("Vulnerable", Its.VULNERABLE),
    ("Mitigation: Vulnerable, KVM: Not affected", Its.VMEXIT_ONLY),
    ("Mitigation: Aligned branch/return thunks", Its.ALIGNED_THUNKS),
    ("Mitigation: Retpolines, Stuffing RSB", Its.RETPOLINE_STUFF),
    (None, Its.ABSENT), ("Mitigation: something newer", Its.UNKNOWN),
])
def test_its_lines_parse_and_reach_the_agent(text: str | None, its: Its) -> None:
    assert parse_its(text) is its
    d = decide("Mitigation: Retpolines; BHI: Retpoline", "", text)
    assert d.its is its and d.to_json()["its"] == its.name and any("indirect_target_selection" in r
                                                                    for r in d.reasons)
    assert d.relies_on == ["retpoline"]  # reported, never requested: the interface has no ITS bit
