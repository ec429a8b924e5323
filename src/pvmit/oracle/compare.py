"""One case's result beside pvmit's prediction. Works on the recorded form (a JSON object), so a live run and the
fixture test (tests/fixtures/linux_oracle.json, re-evaluated against the current model) use the same rules.

Three agreements per case:
  kernel       the spectre_v2 mode and BHI state, and the indirect_target_selection line, the kernel printed == what
               pvmit's model predicts for that kernel's version and build (the case records both), the personality
               (what this QEMU model shows under TCG) and the case's command line, to the text
  agent        what the agent decided in the guest == what the agent decides on the line the model predicts (the
               model's reliance, wherever the line says it)
  personality  the identity and CPUID registers the guest really saw == the personality template
"""

from __future__ import annotations

from typing import Any

from pvmit.agent.decide import decide
from pvmit.catalog.facts import VENDOR_IDS
from pvmit.catalog.loader import Catalog
from pvmit.linux.kernel import Kernel, KernelVersion
from pvmit.linux.model import Cmdline, predict
from pvmit.linux.spectre_v2 import parse_its, parse_spectre_v2
from pvmit.oracle.cases import Case
from pvmit.vmm.personality import Personality, resolve

CPUID_SEEN = ("cpuid_7_0_edx", "cpuid_7_2_edx", "cpuid_80000008_ebx", "cpuid_80000021_eax")
"""The registers the agent reads in the guest (a leaf beyond the largest one counts as 0, as Linux reads it)."""


def personality_differences(p: Personality, cpu: dict[str, Any]) -> list[str]:
    """Where the template differs from what the guest saw (only bits the template knows are compared)."""
    f = p.facts
    diffs = [f"{key}: template {want!r}, guest saw {cpu.get(key)!r}"
             for key, want in (("vendor", VENDOR_IDS[f.vendor]), ("family", f.family), ("model", f.model),
                               ("stepping", f.stepping)) if cpu.get(key) != want]
    for key in CPUID_SEEN:
        rf = f.reg(key)
        got = int(cpu.get(key) or "0x0", 16)
        if (got ^ rf.value) & rf.known:
            diffs.append(f"{key}: template {rf.value:#x}, guest saw {got:#x}")
    if cpu.get("hypervisor") is not True:
        diffs.append("CPUID.1.ECX[31] (hypervisor) clear: the prediction assumes a guest")
    return diffs


def kernel_of(observed: dict[str, Any]) -> Kernel:
    """The kernel a recorded case ran: its upstream version (from /proc/version) and whether it was built with
    KVM (from its /boot/config, recorded as `kvm`; Debian's are)."""
    k = observed["kernel"]
    return Kernel(KernelVersion.parse(k["version"]), kvm=k.get("kvm") is not False)


def evaluate(case: Case, observed: dict[str, Any], catalog: Catalog) -> dict[str, Any]:
    """The case's result: what was observed, what pvmit predicts for that kernel, and the three agreements."""
    p = resolve(catalog, case.personality)
    kernel = kernel_of(observed)
    prediction = predict(p.facts, Cmdline.parse(case.cmdline), hypervisor=True, kernel=kernel)
    line = observed["sysfs"]["spectre_v2"]
    seen = parse_spectre_v2(line)
    its_line = observed["sysfs"].get("indirect_target_selection")
    its = parse_its(its_line)
    agent = observed.get("agent") or {}
    agent_relies = agent.get("relies_on")
    expected_agent = decide(prediction.sysfs_line, case.cmdline).relies_on
    diffs = personality_differences(p, observed.get("cpu") or {})
    fields = [f.strip() for f in line.split(";")]
    agree = {
        "kernel": (seen.mode, seen.bhi, its) == (prediction.mode, prediction.printed_bhi, prediction.its)
        and fields[0] == prediction.sysfs_mode and (prediction.sysfs_bhi is None or prediction.sysfs_bhi in fields),
        "agent": agent_relies is not None and sorted(agent_relies) == sorted(expected_agent),
        "personality": not diffs,
    }
    all_agree = all(agree.values())
    return {
        **case.to_json(),
        "kernel": {"version": str(kernel.version), "kvm": kernel.kvm},
        "observed": observed,
        "kernel_says": {"mode": seen.mode.value if seen.mode else None, "bhi": seen.bhi.name, "its": its.name},
        "prediction": {**prediction.to_json(), "agent_relies_on": sorted(expected_agent)},
        "personality_differences": diffs,
        "agree": agree,
        "as_expected": all_agree if case.expect == "agree" else not all_agree,
    }
