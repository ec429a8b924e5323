"""Property-based tests of the protocol core: random interleavings of guest reads and writes (reserved bits and
values beyond 64 bits included), operator changes, vCPU resets and snapshot/restore onto other hosts, with the
invariants checked after every step, the promise among them: a reported mitigation is never left ineffective
without its control held, unless an operator override says so (`pvmit.safety.verify.promise_violations`, the
same check `pvmit verify` counts)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pvmit.catalog.loader import load_catalog
from pvmit.interface import Form, InterfaceConfig, OperatorSettings, VmInterface, decide, restore, snapshot
from pvmit.interface.forms import ALL_INTERFACE_MSRS
from pvmit.interface.policy import FORCEABLE, supported_requests
from pvmit.safety.verify import promise_violations
from pvmit.x86.bits import SpecCtrl

CATALOG = load_catalog()
MODELS = [m.id for m in CATALOG]
MSRS = sorted(ALL_INTERFACE_MSRS | {0x48, 0x10A, 0x49, 0x4B564D00})
VALUES = st.one_of(
    st.integers(0, 3), st.sampled_from([1 << i for i in range(64)]), st.integers(0, (1 << 64) - 1),
    st.integers(1 << 64, 1 << 70), st.integers(-5, -1),
    st.sampled_from([int(SpecCtrl.RRSBA_DIS_S), int(SpecCtrl.BHI_DIS_S), 0x441, (3 << 32) | 2, (1 << 32) | 1]),
)
FORCE_BITS = [int(b) for b in SpecCtrl if b & FORCEABLE]


@st.composite
def operator_settings(draw: st.DrawFn) -> OperatorSettings:
    on = draw(st.sets(st.sampled_from(FORCE_BITS), max_size=2))
    off = draw(st.sets(st.sampled_from([b for b in FORCE_BITS if b not in on]), max_size=2))
    return OperatorSettings(sum(on), sum(off), draw(st.sampled_from(["trust", "assume-worst"])))


class Protocol(RuleBasedStateMachine):
    vm: VmInterface

    @initialize(form=st.sampled_from(list(Form)), supported=st.integers(0, 3), host=st.sampled_from(MODELS),
                personality=st.sampled_from(MODELS), vcpus=st.integers(1, 3), ops=operator_settings())
    def boot(self, form: Form, supported: int, host: str, personality: str, vcpus: int,
             ops: OperatorSettings) -> None:
        # A VMM promises (MITIGATION_ENUM) only what its host can honour; `supported` picks among those bits.
        supported &= supported_requests([CATALOG.get(host).facts])
        self.vm = VmInterface(InterfaceConfig(form, supported), CATALOG.get(host).facts,
                              CATALOG.get(personality).facts, ops, vcpus)
        self.spec = [0] * vcpus
        self.ctrl = [0] * vcpus

    def _vcpu(self, data: st.DataObject) -> int:
        return data.draw(st.integers(0, len(self.vm.vcpus) - 1))

    @rule(data=st.data(), index=st.sampled_from(MSRS), value=VALUES)
    def guest_writes(self, data: st.DataObject, index: int, value: int) -> None:
        i = self._vcpu(data)
        ok = self.vm.wrmsr(i, index, value)
        if not ok:
            assert self.vm.last_fault
        if ok and index == 0x48:
            self.spec[i] = value
        if ok and index == self.vm.config.ctrl_msr:
            self.ctrl[i] = value & 0xFFFF_FFFF
        if index == 0x48:
            assert ok == (0 <= value < 1 << 64 and not value & ~self.vm.vcpus[i].spec.writable)

    @rule(data=st.data())
    def operator_forces_off_what_the_guest_then_sets(self, data: st.DataObject) -> None:
        """The case a uniform draw seldom makes: the operator forces a bit off that the guest's personality lets it
        write, and the guest then sets exactly that bit (with others it may write)."""
        i = self._vcpu(data)
        writable = self.vm.vcpus[i].spec.writable
        choices = [b for b in FORCE_BITS if b & writable]
        if not choices:
            return
        bit = data.draw(st.sampled_from(choices))
        old = self.vm.settings
        self.vm.set_settings(OperatorSettings(old.force_on & ~bit, old.force_off | bit, old.unreported))
        value = bit | (data.draw(st.integers(0, (1 << 11) - 1)) & writable)
        assert self.vm.wrmsr(i, 0x48, value), self.vm.last_fault
        self.spec[i] = value
        assert self.vm.rdmsr(i, 0x48) == value and not self.vm.vcpus[i].spec.effective & bit

    @rule(data=st.data(), index=st.sampled_from(MSRS))
    def guest_reads(self, data: st.DataObject, index: int) -> None:
        i = self._vcpu(data)
        value = self.vm.rdmsr(i, index)
        if index == 0x48:
            assert value == self.spec[i], "the guest reads back its own IA32_SPEC_CTRL"
        elif index == self.vm.config.ctrl_msr:
            assert value is not None and value & 0xFFFF_FFFF == self.ctrl[i]
        if value is None:
            assert self.vm.last_fault

    @rule(ops=operator_settings())
    def operator_changes(self, ops: OperatorSettings) -> None:
        self.vm.set_settings(ops)

    @rule(data=st.data())
    def reset(self, data: st.DataObject) -> None:
        i = self._vcpu(data)
        self.vm.reset_vcpu(i)
        self.spec[i] = self.ctrl[i] = 0

    @rule(host=st.sampled_from(MODELS))
    def migrate(self, host: str) -> None:
        state = json.loads(json.dumps(snapshot(self.vm)))
        verdict, vm2 = restore(state, CATALOG.get(host).facts)
        assert verdict.accepted == (vm2 is not None)
        if vm2 is not None:
            assert all(d.safe for d in verdict.decisions)
            self.vm = vm2
        else:
            assert verdict.reasons

    @invariant()
    def forced_bits_hold_and_the_policy_agrees(self) -> None:
        vm = getattr(self, "vm", None)
        if vm is None:
            return
        for i, v in enumerate(vm.vcpus):
            s = v.spec
            assert s.effective & s.mask == s.forced & s.mask, "forced bits are in effect"
            assert s.effective & ~s.mask == s.guest & ~s.mask, "unforced bits are the guest's"
            assert s.guest == self.spec[i] and v.ctrl == self.ctrl[i]
            assert not v.ctrl & ~vm.config.supported
            assert s.intercept == (s.mask != 0) == vm.intercept_spec_ctrl(i)
            again = decide(vm.host, v.reliance, vm.personality, vm.settings)
            assert again == v.decision, "the policy is deterministic and the core applies it"
            assert (s.mask, s.forced) == (again.mask, again.value)
            assert s.mask & vm.settings.force_on == vm.settings.force_on
            assert not s.effective & vm.settings.force_off
        assert not promise_violations(vm), promise_violations(vm)


TestProtocol = Protocol.TestCase
TestProtocol.settings = settings(max_examples=150, stateful_step_count=30, deadline=None,
                                 suppress_health_check=[HealthCheck.too_slow])
