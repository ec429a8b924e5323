"""The Linux oracle: Debian's own kernels (6.1 and 6.12) booted under QEMU (TCG) for QEMU CPU models x command lines.

The recorded results (tests/fixtures/linux_oracle-<branch>.json, one per kernel, written by `pvmit oracle linux
--kernel ... --record`) are evaluated again against the current model, for the kernel version each case records,
and against the current agent on every run: a case marked "agree" must still agree, a documented disagreement must
still disagree. One case per recorded kernel is booted for real where qemu-system-x86_64, that kernel, busybox and
python3 are installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pvmit.agent.decide import decide
from pvmit.catalog.loader import Catalog
from pvmit.linux.kernel import KernelVersion
from pvmit.oracle import initramfs
from pvmit.oracle.boot import BootFailed, find_qemu, parse
from pvmit.oracle.cases import all_cases, select
from pvmit.oracle.compare import evaluate
from pvmit.oracle.cpio import Entry, newc
from pvmit.oracle.linux import kernel_config, observed, run
from pvmit.vmm.personality import resolve

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("linux_oracle-*.json"))
DOCS: dict[str, dict[str, Any]] = {f.stem.removeprefix("linux_oracle-"): json.loads(f.read_text()) for f in FIXTURES}
"""Recorded runs by kernel branch ('6.1', '6.12')."""
CASES = {c.id: c for c in all_cases()}
RECORDS = [(branch, r) for branch, doc in DOCS.items() for r in doc["cases"]]
RECORD_IDS = [f"{branch}:{r['id']}" for branch, r in RECORDS]


def recorded(branch: str, case_id: str) -> dict[str, Any]:
    return next(r for r in DOCS[branch]["cases"] if r["id"] == case_id)


def test_both_debian_kernels_are_recorded() -> None:
    assert set(DOCS) == {"6.1", "6.12"}
    for branch, doc in DOCS.items():
        v = KernelVersion.parse(doc["kernel"]["version"])
        assert v.branch_name == branch and doc["kernel"]["package"].startswith(f"linux-image-{branch}")
        assert doc["kernel"]["config"]["CONFIG_KVM"] == "m"


@pytest.mark.parametrize("branch", sorted(DOCS))
def test_the_record_is_broad_and_complete(branch: str) -> None:
    doc = DOCS[branch]
    assert doc["schema"] == "pvmit.linux-oracle/2" and doc["accel"] == "tcg"
    assert "Debian" in doc["kernel"]["version"]
    by_id = {r["id"]: r for r in doc["cases"]}
    assert len(by_id) >= 8 and not doc["failures"]
    assert len({r["cpu"] for r in by_id.values()}) >= 6
    assert len({r["cmdline"] for r in by_id.values()}) >= 8
    assert set(by_id) == set(CASES), "cases.toml and the record differ: run pvmit oracle linux --record"
    for r in by_id.values():  # every record is of the case as defined now, on this kernel
        c = CASES[r["id"]]
        assert (r["cpu"], r["cmdline"]) == (c.cpu, c.cmdline)
        assert r["observed"]["proc_cmdline"].endswith(c.cmdline)
        assert r["observed"]["kernel"]["version"] == doc["kernel"]["version"]


@pytest.mark.parametrize("branch,r", RECORDS, ids=RECORD_IDS)
def test_recorded_kernel_against_the_current_model(catalog: Catalog, branch: str, r: dict[str, Any]) -> None:
    """The kernel's recorded choice, against what pvmit predicts today for that kernel's version."""
    case = CASES[r["id"]]
    now = evaluate(case, r["observed"], catalog)
    assert now["kernel"]["version"].startswith(branch + ".")
    assert not now["personality_differences"], now["personality_differences"]
    if case.expect == "agree":
        assert all(now["agree"].values()), (now["agree"], r["observed"]["sysfs"], now["prediction"])
    else:
        assert not all(now["agree"].values()), f"{r['id']} is a documented disagreement but now agrees"


@pytest.mark.parametrize("branch,r", RECORDS, ids=RECORD_IDS)
def test_agent_in_the_guest_decided_as_the_agent_does_now(branch: str, r: dict[str, Any]) -> None:
    o = r["observed"]
    now = decide(o["sysfs"]["spectre_v2"], o["proc_cmdline"], o["sysfs"].get("indirect_target_selection"))
    assert o["agent"]["relies_on"] == now.relies_on and o["agent"]["request_bits"] == hex(now.bits)


def test_the_two_kernels_differ_where_the_version_rules_say() -> None:
    """What the kernel-version axis exists for, as the two kernels printed it."""
    def line(branch: str, case_id: str, file: str = "spectre_v2") -> str:
        return str(recorded(branch, case_id)["observed"]["sysfs"][file])

    # spectre_bhi=vmexit (42c141fbb651, 6.11): 6.1 ignores it and runs the loop on system calls, 6.12 does not
    assert line("6.1", "skylake-server:lfence-bhi-vmexit").endswith("BHI: SW loop, KVM: SW loop")
    assert line("6.12", "skylake-server:lfence-bhi-vmexit").endswith("BHI: Vulnerable, KVM: SW loop")
    assert recorded("6.1", "skylake-server:lfence-bhi-vmexit")["observed"]["agent"]["relies_on"] == ["bhb-short"]
    assert recorded("6.12", "skylake-server:lfence-bhi-vmexit")["observed"]["agent"]["relies_on"] == []
    # indirect_target_selection=stuff (facd226f7e0c): 6.12 only; 6.1 has no call depth tracking
    assert line("6.1", "skylake-server:its-stuff", "indirect_target_selection") == \
        "Mitigation: Aligned branch/return thunks"
    assert line("6.12", "skylake-server:its-stuff", "indirect_target_selection") == \
        "Mitigation: Retpolines, Stuffing RSB"


@pytest.mark.parametrize("branch", sorted(DOCS))
def test_tcg_offers_no_interface_and_no_speculation_controls(branch: str) -> None:
    """What docs/linux-guests.md says TCG cannot show, as the guests saw it."""
    for r in DOCS[branch]["cases"]:
        o = r["observed"]
        assert o["agent"]["exit_status"] == 6 and o["agent"]["interface"] == "not offered"
        assert "hypervisor leaves: 0x40000000 'TCGTCGTCGTCG'" in o["agent"]["probes"]
        # (EPYC-Rome guests do list "ssbd": Linux synthesizes it on family 0x17 when RDMSR of LS_CFG succeeds, and
        # TCG answers that RDMSR; it is not a CPUID bit)
        assert not {"ibrs", "ibpb", "stibp", "arch_capabilities", "ibrs_enhanced", "amd_ssbd"} & set(o["flags"])
        assert {o["cpu"][k] for k in ("cpuid_7_0_edx", "cpuid_80000008_ebx")} == {"0x0"}
        assert "hypervisor" in o["flags"] and o["cpu"]["hypervisor"] is True


def test_the_oracle_finds_both_reliances() -> None:
    for doc in DOCS.values():
        relied = {tuple(r["observed"]["agent"]["relies_on"]) for r in doc["cases"]}
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


def installed_kernel(branch: str, recorded_image: Path) -> Path:
    """The recorded kernel where it is installed, else the newest /boot/vmlinuz-<branch>.* (a newer Debian update
    of the same branch: the case must still agree with the model for that version)."""
    if recorded_image.is_file():
        return recorded_image
    found = sorted(Path("/boot").glob(f"vmlinuz-{branch}.*"),
                   key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name)])
    return found[-1] if found else recorded_image


def _real_boot_prerequisites(image: Path) -> None:
    try:
        find_qemu()
        initramfs.find_kernel(image)
        initramfs.find_python()
        initramfs.find_busybox()
    except initramfs.OracleUnavailable as e:
        pytest.skip(f"cannot boot a real kernel here: {e}")


@pytest.mark.qemu
@pytest.mark.parametrize("branch", sorted(DOCS))
def test_boot_one_case_for_real(catalog: Catalog, branch: str) -> None:
    """Boots the recorded Debian kernel of `branch` under QEMU TCG with the agent in the guest (10-40 s here); the
    6.12 kernel's modules are .ko.xz, read with the standard library's lzma."""
    doc = DOCS[branch]
    image = installed_kernel(branch, Path(doc["kernel"]["image"]))
    _real_boot_prerequisites(image)
    case = CASES["skylake-server:lfence-bhi-vmexit"]
    got = run([case], catalog, kernel=image, jobs=1, timeout=300)
    assert not got["failures"], got["failures"]
    r = got["cases"][0]
    assert r["as_expected"], r["agree"]
    assert KernelVersion.parse(r["observed"]["kernel"]["version"]).branch_name == branch
    rec = recorded(branch, case.id)["observed"]
    if r["observed"]["kernel"]["version"] == rec["kernel"]["version"]:  # the recorded kernel prints the same
        assert r["observed"]["sysfs"] == rec["sysfs"] and r["observed"]["agent"] == {
            **rec["agent"], "stderr": r["observed"]["agent"]["stderr"]}


def test_docs_show_the_recorded_results() -> None:
    from pvmit.oracle.linux import markdown_table
    docs = (Path(__file__).parent.parent / "docs" / "linux-guests.md").read_text()
    for branch, doc in DOCS.items():
        assert markdown_table(doc) in docs, f"docs/linux-guests.md: paste `pvmit oracle linux --markdown` ({branch})"


def test_compressed_modules_are_read(tmp_path: Path) -> None:
    """Debian 6.12 ships msr.ko.xz: the initramfs gets the plain ELF module, whatever the compression."""
    import gzip
    import lzma
    elf = b"\x7fELF" + bytes(60)
    kdir = tmp_path / "lib/modules/9.9/kernel/arch/x86/kernel"
    kdir.mkdir(parents=True)
    (kdir / "msr.ko.xz").write_bytes(lzma.compress(elf, check=lzma.CHECK_CRC32))
    (kdir / "cpuid.ko.gz").write_bytes(gzip.compress(elf))
    k = initramfs.Kernel(tmp_path / "vmlinuz", "9.9", tmp_path / "lib/modules")
    paths = {n: kdir / f"{n}.ko{ext}" for n, ext in (("msr", ".xz"), ("cpuid", ".gz"))}
    for name, path in paths.items():
        assert initramfs._module(k, name) == path and initramfs.module_bytes(path) == elf
    zstd = shutil.which("zstd")
    if zstd:  # Debian's zstd program (Python 3.14 would use compression.zstd)
        subprocess.run([zstd, "-q", "-o", str(kdir / "z.ko.zst"), "-"], input=elf, check=True)
        assert initramfs.module_bytes(kdir / "z.ko.zst") == elf
    (kdir / "bad.ko.xz").write_bytes(b"not xz")
    with pytest.raises(initramfs.OracleUnavailable, match="cannot decompress"):
        initramfs.module_bytes(kdir / "bad.ko.xz")
    (kdir / "text.ko").write_bytes(b"hello")
    with pytest.raises(initramfs.OracleUnavailable, match="not an ELF module"):
        initramfs.module_bytes(kdir / "text.ko")
    with pytest.raises(initramfs.OracleUnavailable, match=r"nope\.ko is missing \(nor \.ko\.xz"):
        initramfs._module(k, "nope")


def test_kernel_config_is_read(tmp_path: Path) -> None:
    (tmp_path / "config-9.9").write_text("CONFIG_KVM=m\n# CONFIG_MITIGATION_ITS is not set\nCONFIG_RETPOLINE=y\n")
    got = kernel_config("9.9", tmp_path)
    assert got["CONFIG_KVM"] == "m" and got["CONFIG_MITIGATION_ITS"] == "n" and got["CONFIG_RETPOLINE"] == "y"
    assert kernel_config("nope", tmp_path) == {}


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
    o, rec = observed(seen), recorded("6.1", "skylake-server:retpoline-lfence")["observed"]
    assert seen.release == DOCS["6.1"]["kernel"]["release"] and o["cpu"] == rec["cpu"]
    assert o["sysfs"]["spectre_v2"] == rec["sysfs"]["spectre_v2"]
    assert o["agent"]["relies_on"] == ["bhb-short"] and o["agent"]["exit_status"] == 6
