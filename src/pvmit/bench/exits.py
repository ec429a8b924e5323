"""`pvmit bench exits`: what pvmit's own code adds to the userspace exit the platform forces.

Four loops of the same guest program (RDMSR N times, then HLT), each timed around the run loop only:
  (a) kvm       RDMSR of IA32_TSC, handled inside KVM;
  (b) bare      RDMSR of an MSR routed to userspace, answered by a do-nothing handler;
  (c) pvmit     the interface's MSR_VIRTUAL_MITIGATION_CTRL through pvmit's full path (filter, exit, core, answer);
  (d) spec_ctrl RDMSR of IA32_SPEC_CTRL with nothing forced: must not leave KVM (its userspace exits are counted).
ratio = (c) / (b). Variants are interleaved and repeated; the median per-iteration time of each is reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from pvmit.guest import program
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.policy import OperatorSettings
from pvmit.kvm import abi
from pvmit.kvm.system import Kvm
from pvmit.vmm.personality import Personality
from pvmit.vmm.vmm import GuestStopped, Host, Vmm
from pvmit.x86.registers import MSR_IA32_SPEC_CTRL, MSR_IA32_TSC, MSR_VIRTUAL_MITIGATION_CTRL

VARIANTS = ("kvm", "bare", "pvmit", "spec_ctrl")


@dataclass
class Sample:
    variant: str
    seconds: float
    iterations: int
    userspace_exits: int
    spec_ctrl_exits: int

    @property
    def per_iteration_us(self) -> float:
        return self.seconds / self.iterations * 1e6


def _bare_loop(vmm: Vmm) -> int:
    """Answer every RDMSR exit with 0 and nothing else; return the number of exits."""
    run, complete = vmm.vcpu.run, vmm.vcpu.complete_rdmsr
    rd, hlt = abi.KVM_EXIT_X86_RDMSR, abi.KVM_EXIT_HLT
    n = 0
    while True:
        x = run()
        n += 1
        reason = x.reason
        if reason == rd:
            complete(0)
        elif reason == hlt:
            return n
        else:
            raise GuestStopped(f"unexpected exit {abi.EXIT_NAMES.get(reason, reason)} in the bare loop")


def sample(kvm: Kvm, personality: Personality, host: Host, variant: str, iterations: int) -> Sample:
    msr = {"kvm": MSR_IA32_TSC, "bare": MSR_VIRTUAL_MITIGATION_CTRL, "pvmit": MSR_VIRTUAL_MITIGATION_CTRL,
           "spec_ctrl": MSR_IA32_SPEC_CTRL}[variant]
    vmm = Vmm(kvm, personality, host, InterfaceConfig(Form.INTEL, 3), OperatorSettings(unreported="trust"))
    try:
        loop = program("msr_loop")
        vmm.load(loop.code, loop.load_address, (msr, iterations))
        start = time.perf_counter()
        if variant == "bare":
            exits = _bare_loop(vmm)
            spec = 0
        else:
            stop = vmm.run(max_exits=iterations + 10, timeout=600)
            if stop != "hlt":
                raise GuestStopped(f"benchmark guest did not halt ({stop})")
            exits, spec = vmm.counts.total, vmm.counts.spec_ctrl
        seconds = time.perf_counter() - start
    finally:
        vmm.close()
    return Sample(variant, seconds, iterations, exits - 1, spec)


def bench(kvm: Kvm, personality: Personality, host: Host, iterations: int = 20_000, repeats: int = 3,
          progress: Callable[[str], None] | None = None) -> dict[str, object]:
    samples: dict[str, list[Sample]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        for v in VARIANTS:
            s = sample(kvm, personality, host, v, iterations)
            samples[v].append(s)
            if progress:
                progress(f"repeat {r + 1}/{repeats} {v}: {s.per_iteration_us:.2f} us per RDMSR, "
                         f"{s.userspace_exits} userspace exits")
    med = {v: statistics.median(s.per_iteration_us for s in samples[v]) for v in VARIANTS}
    spec_exits = max(s.spec_ctrl_exits for s in samples["spec_ctrl"])
    spec_userspace = max(s.userspace_exits for s in samples["spec_ctrl"])
    return {
        "schema": "pvmit.bench-exits/1",
        "iterations": iterations, "repeats": repeats,
        "us_per_rdmsr": {"kvm": round(med["kvm"], 3), "bare": round(med["bare"], 3),
                         "pvmit": round(med["pvmit"], 3), "spec_ctrl_not_forced": round(med["spec_ctrl"], 3)},
        "all_samples_us": {v: [round(s.per_iteration_us, 3) for s in samples[v]] for v in VARIANTS},
        "pvmit_added_us": round(med["pvmit"] - med["bare"], 3),
        "ratio": round(med["pvmit"] / med["bare"], 3),
        "ratio_target": 1.2,
        "spec_ctrl_userspace_exits": spec_exits,
        "spec_ctrl_loop_userspace_exits_total": spec_userspace,
        "personality": personality.name, "host": host.name,
    }
