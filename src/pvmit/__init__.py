"""pvmit: a paravirtual interface through which a guest reports the software Spectre mitigations it relies on,
and the hypervisor forces the IA32_SPEC_CTRL controls that make up for them on the host it runs on now."""

__version__ = "0.1.0"
