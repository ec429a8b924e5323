"""Property-based tests of the BHI policies, LONG_BHB_NEEDED and the pool description: random VMs under every
policy, guest accesses to every new register, migrations to any catalog host, with the promise checked after each
step (`pvmit.safety.verify.promise_violations`, as `pvmit verify` counts it) and what each policy promises about the
new registers; the two IA32_SPEC_CTRL backends agree; the pool-entry encoding round-trips and the guest agent's own
decoder agrees with the hypervisor's."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pvmit.agent import wire
from pvmit.catalog.loader import load_catalog
from pvmit.derive import Mitigation
from pvmit.interface import Form, InterfaceConfig, OperatorSettings, VmInterface, restore, snapshot
from pvmit.interface.bhi import BhiPolicy, long_history
from pvmit.interface.forms import MSR_KVM_PVMIT_POOL, MSR_VIRTUAL_POOL_INFO
from pvmit.interface.policy import supported_requests
from pvmit.interface.pooldesc import MAX_ENTRIES, Implementation, describe_facts
from pvmit.interface.spec_ctrl import HardwareMask, SpecCtrlShadow
from pvmit.safety.verify import promise_violations
from pvmit.x86.bits import SpecCtrl

CATALOG = load_catalog()
MODELS = [m.id for m in CATALOG]
INTEL = [m.id for m in CATALOG if m.vendor == "intel"]
POOL_MSRS = sorted({b + d for b in (MSR_VIRTUAL_POOL_INFO, MSR_KVM_PVMIT_POOL) for d in (0, 1, 2, 3, 32, 33)})
B_DIS = int(SpecCtrl.BHI_DIS_S)

IMPLEMENTATIONS = st.builds(
    lambda vendor, family, model, a, b: Implementation(vendor, family, model if family >= 6 else model & 0xF,
                                                       min(a, b), max(a, b)),
    st.sampled_from(["intel", "amd", "hygon"]), st.integers(0, 0xF + 0xFF), st.integers(0, 0xFF),
    st.integers(0, 15), st.integers(0, 15))


@given(IMPLEMENTATIONS)
def test_pool_entry_round_trips(e: Implementation) -> None:
    value = e.encode()
    assert Implementation.decode(value) == e
    assert wire.decode_pool_entry(value) == {"vendor": e.vendor, "family": e.family, "model": e.model,
                                             "stepping_min": e.stepping_min, "stepping_max": e.stepping_max}


@given(st.integers(0, (1 << 64) - 1))
def test_the_agent_decodes_any_value_as_the_hypervisor_does(value: int) -> None:
    """One layout, two copies (the agent cannot import the hypervisor side): both refuse the same values, and agree
    on the rest."""
    try:
        mine = Implementation.decode(value)
    except ValueError:
        mine = None
    try:
        theirs = wire.decode_pool_entry(value)
    except ValueError:
        theirs = None
    if mine is None:
        assert theirs is None
    else:
        assert theirs == {"vendor": mine.vendor, "family": mine.family, "model": mine.model,
                          "stepping_min": mine.stepping_min, "stepping_max": mine.stepping_max}


@given(st.lists(st.one_of(st.tuples(st.just("write"), st.integers(0, (1 << 11) - 1)),
                          st.tuples(st.just("hold"), st.integers(0, (1 << 11) - 1), st.integers(0, (1 << 11) - 1))),
                max_size=20))
def test_both_backends_put_the_same_value_in_effect(steps: list[tuple[int, ...]]) -> None:
    """Interception (the shadow the core keeps) and the hardware mask (no exit) hold the same value after every
    guest write and every change of the forced bits; the guest reads back what it wrote from either."""
    shadow, hw = SpecCtrlShadow(writable=(1 << 11) - 1), HardwareMask()
    for step in steps:
        if step[0] == "write":
            assert shadow.write(step[1]) is None
            hw.guest_write(step[1])
        else:
            shadow.hold(step[1], step[2])
            hw.hold(step[1], step[2])
        assert hw.value == shadow.effective and hw.guest_read() == shadow.guest
        assert hw.value & hw.mask == hw.forced


class PolicyProtocol(RuleBasedStateMachine):
    """A VM booted in a random pool under a random BHI policy, shown LONG_BHB_NEEDED and the pool description as
    the VMM computes them, then written to and migrated at random."""

    vm: VmInterface

    @initialize(form=st.sampled_from(list(Form)), policy=st.sampled_from(list(BhiPolicy)),
                pool=st.lists(st.sampled_from(INTEL), min_size=1, max_size=3, unique=True),
                personality=st.sampled_from(INTEL), unreported=st.sampled_from(["trust", "assume-worst"]),
                describe=st.booleans())
    def boot(self, form: Form, policy: BhiPolicy, pool: list[str], personality: str, unreported: str,
             describe: bool) -> None:
        hosts = [CATALOG.get(m).facts for m in pool]
        config = InterfaceConfig(form, supported_requests(hosts, policy),
                                 bhb_long=any(long_history(h) for h in hosts) if policy.shows_long_bit else None,
                                 pool=describe_facts(hosts) if describe else None)
        self.vm = VmInterface(config, hosts[0], CATALOG.get(personality).facts,
                              OperatorSettings(unreported=unreported, bhi_policy=policy))  # type: ignore[arg-type]

    @rule(value=st.integers(0, 3))
    def guest_reports(self, value: int) -> None:
        ok = self.vm.wrmsr(0, self.vm.config.ctrl_msr, value)
        assert ok == (not value & ~self.vm.config.supported)

    @rule(index=st.sampled_from(POOL_MSRS), value=st.integers(0, (1 << 64) - 1))
    def guest_touches_the_pool_block(self, index: int, value: int) -> None:
        before = self.vm.rdmsr(0, index)
        assert not self.vm.wrmsr(0, index, value)  # read-only, or not a register at all
        assert self.vm.rdmsr(0, index) == before

    @rule(host=st.sampled_from(MODELS))
    def migrate(self, host: str) -> None:
        facts = CATALOG.get(host).facts
        state = json.loads(json.dumps(snapshot(self.vm)))
        verdict, moved = restore(state, facts)
        assert verdict.accepted == (moved is not None)
        if moved is None:
            return
        cfg = moved.config
        assert cfg == self.vm.config, "what the guest was shown travels unchanged"
        assert not (cfg.bhb_long is False and long_history(facts)), "shown 0 never lands where the loop is short"
        assert cfg.pool is None or any(e.covers(facts.vendor, facts.family, facts.model, facts.stepping)
                                       for e in cfg.pool), "the VM only lands on a listed CPU"
        self.vm = moved

    @invariant()
    def the_promise_and_the_registers_hold(self) -> None:
        vm = getattr(self, "vm", None)
        if vm is None:
            return
        assert not promise_violations(vm), promise_violations(vm)
        policy = vm.settings.bhi_policy
        for v in vm.vcpus:
            d = v.decision
            if not policy.forces_bhi_dis_s:  # the VMM never forces BHI_DIS_S for the guest's sake
                assert not any(f.control is SpecCtrl.BHI_DIS_S and f.why.value != "operator setting"
                               for f in d.forced)
                assert not vm.config.supported & 1 or not long_history(vm.host)
            else:
                assert not d.by_design
            assert all(e.mitigation is Mitigation.BHB_SHORT for e in d.by_design) and (not d.by_design or not
                                                                                      v.reported)
        pool = vm.config.pool
        base = vm.config.pool_msr
        if pool is None:
            assert vm.rdmsr(0, base) is None
        else:
            assert vm.rdmsr(0, base) == len(pool) | 1 << 8
            assert [vm.rdmsr(0, base + 1 + i) for i in range(len(pool))] == [e.encode() for e in pool]
            assert len(pool) == MAX_ENTRIES or vm.rdmsr(0, base + 1 + len(pool)) is None


TestPolicyProtocol = PolicyProtocol.TestCase
TestPolicyProtocol.settings = settings(max_examples=120, stateful_step_count=20, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
