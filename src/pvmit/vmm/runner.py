"""Run pvmit's test guest once on KVM and judge the result: what `pvmit run` does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pvmit.derive import Mitigation, mitigations_to_bits
from pvmit.guest import program
from pvmit.interface.bhi import shown_long_bit
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.policy import OperatorSettings, supported_requests
from pvmit.interface.pooldesc import Implementation, describe_facts
from pvmit.kvm.system import Kvm
from pvmit.vmm.personality import Personality
from pvmit.vmm.vmm import Host, Vmm


@dataclass
class RunReport:
    personality: str
    host: str
    form: str
    uses: list[str]
    supported: int
    stop: str
    transcript: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    decision: dict[str, object] = field(default_factory=dict)
    spec_ctrl: dict[str, object] = field(default_factory=dict)
    exits: dict[str, object] = field(default_factory=dict)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def to_json(self) -> dict[str, object]:
        return {"schema": "pvmit.run/1", "personality": self.personality, "host": self.host, "form": self.form,
                "uses": self.uses, "supported": self.supported, "stop": self.stop, "passed": self.passed,
                "checks": [{"check": c, "ok": ok, "detail": d} for c, ok, d in self.checks],
                "transcript": self.transcript, "events": self.events, "decision": self.decision,
                "spec_ctrl": self.spec_ctrl, "exits": self.exits}


def run_guest(kvm: Kvm, personality: Personality, host: Host, form: Form, uses: frozenset[Mitigation],
              settings: OperatorSettings = OperatorSettings(), *, spec_ctrl_write: int = 0,
              pool: list[Host] | None = None, on_line: Callable[[str], None] | None = None,
              describe_pool: tuple[Implementation, ...] | bool = False) -> RunReport:
    """Boot the test guest on `personality`, offering `form`; it reports `uses` and tries to write
    `spec_ctrl_write` to IA32_SPEC_CTRL. MITIGATION_ENUM covers `pool` (default: this host) under the BHI policy
    of `settings`, which also decides whether LONG_BHB_NEEDED is shown. `describe_pool`: offer the pool description
    (True: made from the pool's hosts; or the entries to show)."""
    facts = [h.facts for h in (pool or [host])]
    policy = settings.bhi_policy
    entries = describe_facts(facts) if describe_pool is True else describe_pool or None
    config = InterfaceConfig(form, supported_requests(facts, policy), bhb_long=shown_long_bit(policy, facts),
                             pool=entries)
    supported = config.supported
    vmm = Vmm(kvm, personality, host, config, settings, on_line=on_line)
    try:
        guest = program("mitigation_guest")
        vmm.load(guest.code, guest.load_address, (mitigations_to_bits(uses), spec_ctrl_write))
        stop = vmm.run()
        vmm.serial.close()
        report = RunReport(personality.name, host.name, form.value, sorted(m.value for m in uses), supported, stop,
                           list(vmm.serial.lines), list(vmm.events), vmm.core.vcpus[0].decision.to_json(),
                           vmm.spec_ctrl_state(), vmm.counts.to_json())
        s = vmm.core.vcpus[0].spec
        d = vmm.core.vcpus[0].decision
        report.checks.append(("guest halted", stop == "hlt", stop))
        found = next((ln for ln in report.transcript if "guest: interface" in ln), "no interface line")
        report.checks.append(("guest found the offered interface", f"interface {form.value} " in found, found))
        report.checks.append(("guest's own checks passed", "guest: RESULT PASS" in report.transcript,
                              next((ln for ln in report.transcript if "RESULT" in ln), "no RESULT line")))
        report.checks.append(("forced bits in effect", s.effective & s.mask == d.value & d.mask,
                              f"effective {s.effective:#x}, forced mask {d.mask:#x} value {d.value:#x}"))
        report.checks.append(("guest reads back its own IA32_SPEC_CTRL", s.guest == spec_ctrl_write
                              or not s.writable, f"guest value {s.guest:#x}"))
        if not s.mask:
            report.checks.append(("no IA32_SPEC_CTRL exits while nothing is forced", vmm.counts.spec_ctrl == 0,
                                  f"{vmm.counts.spec_ctrl} exits"))
        in_use = uses - {Mitigation.BHB_SHORT} if config.bhb_long else uses  # shown the bit: the long loop runs
        unsupported = mitigations_to_bits(in_use) & ~supported
        report.checks.append(("the VMM can honour every mitigation the guest uses", not unsupported,
                              "all enumerated in MITIGATION_ENUM" if not unsupported else
                              f"{', '.join(m.title for m in uses if m.request_bit & unsupported)} cannot be kept "
                              f"effective on every host of the pool: the guest cannot report it and is not protected"))
        report.checks.append(("guest not left exposed", d.safe,
                              "; ".join(e.reason for e in d.exposures) or "no exposure"))
        loop = "long (12x7)" if config.bhb_long else "short (5x5)"
        ran = next((ln for ln in report.transcript if "guest: bhb loop" in ln), "no bhb loop line")
        report.checks.append(("guest ran the BHB-clearing loop it was shown to need", ran.endswith(loop),
                              f"{ran} (LONG_BHB_NEEDED {'shown 1' if config.bhb_long else 'not shown'})"))
        if config.pool is not None:
            want = [f"guest: pool info {config.pool_info:#x}"] + [f"guest: pool entry {e.encode():#x}"
                                                                  for e in config.pool]
            got = [ln for ln in report.transcript if ln.startswith(("guest: pool info", "guest: pool entry"))]
            report.checks.append(("guest read the pool description", got == want,
                                  f"{len(got) - 1 if got else 0} entries read, {len(config.pool)} offered"))
        return report
    finally:
        vmm.close()
