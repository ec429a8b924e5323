"""Fuzzing every parser of outside input (see pvmit.safety.fuzz_targets): random bytes, and mutations of valid
inputs; only each parser's documented error may come out. Crashers found once are replayed from
tests/fixtures/crashers/<target>/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvmit.catalog.loader import builtin_files
from pvmit.interface import Form, InterfaceConfig, VmInterface, snapshot
from pvmit.migration.stream import encode_header, encode_json, encode_pages
from pvmit.safety.fuzz_targets import _CATALOG, TARGETS, run, small_tables

CRASHERS = Path(__file__).parent / "fixtures" / "crashers"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def valid_samples() -> dict[str, list[bytes]]:
    cat = _CATALOG()
    vm = VmInterface(InterfaceConfig(Form.INTEL, 3), cat.get("icelake-sp").facts, cat.get("icelake-sp").facts)
    vm.wrmsr(0, 0x50000002, 2)
    state = json.dumps(snapshot(vm)).encode()
    from pvmit.vmm.personality import resolve

    pers = json.dumps(resolve(cat, "icelake-server-v2").to_json()).encode()
    stream = encode_header({"vm": {}}) + encode_json(b"HELO", json.loads(state)) + encode_pages(1, bytes(8192))
    template = (Path(__file__).parent.parent / "src/pvmit/vmm/personalities/icelake-server-v2.toml").read_bytes()
    inv = json.loads((Path(__file__).parent.parent / "src/pvmit/fleet/data/sample-inventory.json").read_text())
    tcg = (Path(__file__).parent.parent / "src/pvmit/vmm/personalities/qemu-tcg-qemu64.toml").read_bytes()
    # words 0-39: CPUID leaves 0, 1, 7, 0x80000000, 0x80000008, 0x80000021, 0x40000000, 0x40000001, 0x40000100,
    # 0x40000101 (the neutral form there, offering both bits); 40-49: MSR values; the last: writes are kept
    words = [7, 0, 0, 0] + [0, 0, 1 << 31, 0] + [0] * 24 + [0x40000101, 0x74726956, 0x6974694D, 0x6C744367] \
        + [1, 0x50000002, 3, 0] + [1, 0] * 5 + [1]
    agent_offer = b"".join(w.to_bytes(4, "little") for w in words)
    return {
        "stream": [stream], "interface_state": [state], "personality": [pers],
        "catalog_file": [builtin_files()[1][1].encode()[:6000]], "personality_template": [template, tcg],
        "kernel_cmdline": [b"quiet spectre_v2=retpoline spectre_bhi=vmexit retbleed=off mitigations=auto"],
        "sysfs_line": [b"Mitigation: Enhanced / Automatic IBRS; IBPB: conditional; BHI: BHI_DIS_S"],
        "guest_msrs": [bytes(range(256))],
        "inventory_json": [json.dumps({"hosts": inv["hosts"][:12], "vms": inv["vms"][:40]}).encode()],
        "inventory_csv": [b"\0" + small_tables(".csv")["vms"], b"\1" + small_tables(".csv")["hosts"]],
        "inventory_parquet": [b"\0" + small_tables(".parquet")["vms"], b"\1" + small_tables(".parquet")["hosts"]],
        "agent_decision": [b"Vulnerable: LFENCE; STIBP: disabled; BHI: SW loop, KVM: SW loop\nspectre_v2=retpoline"],
        "agent_hypervisor": [agent_offer],
        "oracle_serial": [(Path(__file__).parent / "fixtures" / "oracle_serial.txt").read_bytes()],
        "cpu_list": [b"0-3,5,7-8\n"],
        "json_document": [json.dumps({"hosts": inv["hosts"][:4], "vms": inv["vms"][:4], "n": [1, -2.5e3, None]},
                                     ensure_ascii=False).encode() + "\u00e9\U0001f600".encode()[:0]],
        "toml_document": [template, builtin_files()[1][1].encode()[:3000]],
        "host_facts": [json.dumps(cat.get("icelake-sp").facts.to_json()).encode()],
        "shown_text": ["vm-01 \x1b[31mred\x1b[0m \u202eevil\u202c caf\u00e9 \U0001f600".encode()],
        "option_numbers": [b"0x10", b"64M", b"2000", b"120.5"],
    }


SAMPLES = valid_samples()


@st.composite
def mutated(draw: st.DrawFn, name: str) -> bytes:
    base = bytearray(draw(st.sampled_from(SAMPLES[name])))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, max(len(base) - 1, 0)))
        if op == 0 and base:
            base[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            del base[pos:pos + draw(st.integers(1, 64))]
        elif op == 2:
            base[pos:pos] = draw(st.binary(max_size=64))
        else:
            base = base[:pos]
    return bytes(base)


@pytest.mark.parametrize("name", sorted(TARGETS))
@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(name: str, data: bytes) -> None:
    run(name, data)


@pytest.mark.parametrize("name", sorted(TARGETS))
@FUZZ
@given(data=st.data())
def test_mutated_valid_inputs(name: str, data: st.DataObject) -> None:
    run(name, data.draw(mutated(name)))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_valid_inputs_pass(name: str) -> None:
    for sample in SAMPLES[name]:
        run(name, sample)


def crasher_cases() -> list[tuple[str, Path]]:
    return [(d.name, f) for d in sorted(CRASHERS.iterdir()) if d.is_dir() for f in sorted(d.iterdir())]


@pytest.mark.parametrize("name,path", crasher_cases(), ids=lambda x: str(x)[-40:] if isinstance(x, Path) else x)
def test_kept_crashers(name: str, path: Path) -> None:
    run(name, path.read_bytes())
