"""The guest agent: enlightens an unmodified Linux guest by doing, from user space, what the RFC's kernel patch
would have done at boot.

It learns from the running kernel which software mitigations it relies on (`decide`), finds the form of the
interface the hypervisor offers (`discover`), and writes the request bits to the CTRL register of every online
CPU through the msr driver (`msrdev`), reading them back. Run it as `python3 -m pvmit.agent status|report`.

Standard library only, and nothing from pvmit outside this package but `pvmit.linux.spectre_v2`: it must run in
small guests that have python3 and these files (`bundle.agent_files()` lists them) and nothing else.
"""
