"""The Linux oracle: Debian's own kernel booted under QEMU (TCG) for QEMU CPU models x command lines.

The recorded results (tests/fixtures/linux_oracle.json, written by `pvmit oracle linux --record`) are evaluated
again against the current model and agent on every run: a case marked "agree" must still agree, a documented
disagreement must still disagree. One case is booted for real where qemu-system-x86_64, a Debian kernel, busybox
and python3 are installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pvmit.agent.decide import decide
from pvmit.catalog.loader import Catalog
from pvmit.oracle import initramfs
from pvmit.oracle.boot import BootFailed, find_qemu, parse
from pvmit.oracle.cases import all_cases, select
from pvmit.oracle.compare import evaluate
from pvmit.oracle.cpio import Entry, newc
from pvmit.oracle.linux import observed, run
from pvmit.vmm.personality import resolve

FIXTURE = Path(__file__).parent / "fixtures" / "linux_oracle.json"
DOC = json.loads(FIXTURE.read_text())
RECORDED = {r["id"]: r for r in DOC["cases"]}
CASES = {c.id: c for c in all_cases()}


def test_the_record_is_broad_and_complete() -> None:
    assert DOC["schema"] == "pvmit.linux-oracle/1" and DOC["accel"] == "tcg"
    assert DOC["kernel"]["package"].startswith("linux-image-") and "Debian" in DOC["kernel"]["version"]
    assert len(RECORDED) >= 8 and not DOC["failures"]
    assert len({r["cpu"] for r in RECORDED.values()}) >= 6
    assert len({r["cmdline"] for r in RECORDED.values()}) >= 8
    assert set(RECORDED) == set(CASES), "cases.toml and the record differ: run pvmit oracle linux --record"
    for r in RECORDED.values():  # every record is of the case as defined now
        c = CASES[r["id"]]
        assert (r["cpu"], r["cmdline"]) == (c.cpu, c.cmdline)
        assert r["observed"]["proc_cmdline"].endswith(c.cmdline)


@pytest.mark.parametrize("case_id", sorted(RECORDED))
def test_recorded_kernel_against_the_current_model(catalog: Catalog, case_id: str) -> None:
    """The kernel's recorded choice, against what pvmit predicts today."""
    case = CASES[case_id]
    r = evaluate(case, RECORDED[case_id]["observed"], catalog)
    assert not r["personality_differences"], r["personality_differences"]
    if case.expect == "agree":
        assert all(r["agree"].values()), (r["agree"], r["observed"]["sysfs"]["spectre_v2"], r["prediction"])
    else:
        assert not all(r["agree"].values()), f"{case_id} is a documented disagreement but now agrees: update cases.toml"


@pytest.mark.parametrize("case_id", sorted(RECORDED))
def test_agent_in_the_guest_decided_as_the_agent_does_now(case_id: str) -> None:
    o = RECORDED[case_id]["observed"]
    now = decide(o["sysfs"]["spectre_v2"], o["proc_cmdline"])
    assert o["agent"]["relies_on"] == now.relies_on and o["agent"]["request_bits"] == hex(now.bits)


def test_tcg_offers_no_interface_and_no_speculation_controls() -> None:
    """What docs/linux-guests.md says TCG cannot show, as the guests saw it."""
    for r in RECORDED.values():
        o = r["observed"]
        assert o["agent"]["exit_status"] == 6 and o["agent"]["interface"] == "not offered"
        assert "hypervisor leaves: 0x40000000 'TCGTCGTCGTCG'" in o["agent"]["probes"]
        # (EPYC-Rome guests do list "ssbd": Linux synthesizes it on family 0x17 when RDMSR of LS_CFG succeeds, and
        # TCG answers that RDMSR; it is not a CPUID bit)
        assert not {"ibrs", "ibpb", "stibp", "arch_capabilities", "ibrs_enhanced", "amd_ssbd"} & set(o["flags"])
        assert {o["cpu"][k] for k in ("cpuid_7_0_edx", "cpuid_80000008_ebx")} == {"0x0"}
        assert "hypervisor" in o["flags"] and o["cpu"]["hypervisor"] is True


def test_the_oracle_finds_both_reliances() -> None:
    relied = {tuple(r["observed"]["agent"]["relies_on"]) for r in RECORDED.values()}
    assert {("retpoline",), ("bhb-short",), ()} <= relied


def test_templates_describe_what_tcg_shows(catalog: Catalog) -> None:
    for c in all_cases():
        p = resolve(catalog, c.personality)
        assert p.facts.reg("cpuid_7_0_edx").value == 0 and p.facts.reg("arch_capabilities").known


def test_case_selection() -> None:
    assert [c.id for c in select("EPYC-Rome")] == [c.id for c in all_cases() if c.cpu == "EPYC-Rome"]
    assert len(select("qemu64:auto,max")) == 2
    with pytest.raises(Exception, match="no case or CPU model"):
        select("pentium")


def test_cpio_newc_layout() -> None:
    data = newc([Entry("init", 0o100755, b"#!/bin/sh\n")])
    assert data.startswith(b"070701") and b"TRAILER!!!" in data and len(data) % 4 == 0
    assert data[6:14] == b"00000001" and data[14:22] == b"000081ED"  # inode 1, regular file 0755


def test_parse_serial_output() -> None:
    out = ("SeaBIOS noise\r\n" + initramfs.BEGIN + "\r\n@@release 6.1.0-x\r\n@@vuln spectre_v2 Mitigation: Retpolines; "
           "BHI: Retpoline\r\n@@agent-exit 6\r\n@@agent-json {\"decision\": {\"relies_on\": [\"retpoline\"]}}\r\n"
           + initramfs.END + "\r\n[ 4.9] reboot: Power down\r\n")
    seen = parse(out)
    assert seen.release == "6.1.0-x" and seen.agent_exit == 6
    assert seen.vulnerabilities["spectre_v2"].endswith("BHI: Retpoline")
    assert observed(seen)["agent"]["relies_on"] == ["retpoline"]
    with pytest.raises(BootFailed, match="did not finish"):
        parse("Kernel panic - not syncing\n")


def _real_boot_prerequisites() -> None:
    try:
        find_qemu()
        initramfs.find_kernel()
        initramfs.find_python()
        initramfs.find_busybox()
    except initramfs.OracleUnavailable as e:
        pytest.skip(f"cannot boot a real kernel here: {e}")


@pytest.mark.qemu
def test_boot_one_case_for_real(catalog: Catalog) -> None:
    """Boots Debian's kernel under QEMU TCG with the agent in the guest (about 10-25 s)."""
    _real_boot_prerequisites()
    case = CASES["skylake-server:retpoline-lfence"]
    doc = run([case], catalog, jobs=1, timeout=300)
    assert not doc["failures"], doc["failures"]
    r = doc["cases"][0]
    assert r["as_expected"] and r["observed"]["agent"]["relies_on"] == ["bhb-short"]
    recorded = RECORDED[case.id]["observed"]
    if doc["kernel"]["release"] == DOC["kernel"]["release"]:  # the same kernel prints the same line
        assert r["observed"]["sysfs"] == recorded["sysfs"] and r["observed"]["agent"] == {
            **recorded["agent"], "stderr": r["observed"]["agent"]["stderr"]}


def test_docs_show_the_recorded_results() -> None:
    from pvmit.oracle.linux import markdown_table
    docs = (Path(__file__).parent.parent / "docs" / "linux-guests.md").read_text()
    assert markdown_table(DOC) in docs, "docs/linux-guests.md: paste `pvmit oracle linux --markdown` output"


def test_oracle_cli_errors(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("oracle", "linux", "--cases", "list")
    assert r.code == 0 and "epyc-rome:retpoline-lfence" in r.stdout
    r = cli("oracle", "linux", "--cases", "pentium")
    assert r.code == 2 and r.stdout == "" and "no case or CPU model 'pentium'" in r.stderr
    r = cli("oracle", "linux", "--cases", "qemu64:auto", "--qemu", "/nonexistent/qemu", "--json")
    assert r.code == 1 and r.stdout == "" and "apt-get install" in r.stderr


def test_parse_a_real_serial_log() -> None:
    """A whole serial log of one boot (tests/fixtures/oracle_serial.txt, CRLF and all) reads as the record."""
    seen = parse((Path(__file__).parent / "fixtures" / "oracle_serial.txt").read_text())
    o, rec = observed(seen), RECORDED["skylake-server:retpoline-lfence"]["observed"]
    assert seen.release == DOC["kernel"]["release"] and o["sysfs"] == rec["sysfs"] and o["cpu"] == rec["cpu"]
    assert o["agent"]["relies_on"] == ["bhb-short"] and o["agent"]["exit_status"] == 6
