"""The mitigation-reporting protocol as pure state machines: wire forms, forcing policy, SPEC_CTRL mask and
shadow, and state snapshots. No I/O: backends (the KVM VMM, migration, the fleet planner, tests) drive it."""

from pvmit.interface.core import SpecCtrlChanged, VmInterface
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.policy import Decision, OperatorSettings, decide, supported_requests
from pvmit.interface.state import Verdict, check, restore, snapshot

__all__ = [
    "Decision", "Form", "InterfaceConfig", "OperatorSettings", "SpecCtrlChanged", "Verdict", "VmInterface", "check",
    "decide", "restore", "snapshot", "supported_requests",
]
