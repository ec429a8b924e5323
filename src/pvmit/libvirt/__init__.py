"""libvirt: the stack most KVM fleets run. pvmit reads hosts and guests from it and guards its migrations.

The core is pure and needs nothing from libvirt itself: the names libvirt and QEMU give CPU features
(`features`: the table `pvmit.x86.feature_names` shared with `pvmit pool`, and what a TCG guest is shown,
`data/tcg.toml`), libvirt's CPU model map (`cpumap`), the XML libvirt writes (`parse`), CPU facts from them
(`facts`), pvmit's own element in a domain's metadata (`record`), the guest agent's replies (`agent`), and the
migration verdict (`verdict`, the fleet planner's rules). The binding that libvirt's
project maintains (libvirt-python, `pip install 'pvmit[libvirt]'`) is imported only by `connection` and what
uses it (`inventory`); the migration hook (`hook`) runs without it, as libvirt forbids a hook to call back into
libvirt.
"""
