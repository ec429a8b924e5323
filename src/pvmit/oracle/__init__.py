"""The Linux oracle: pvmit's model of Linux's spectre_v2/BHI choice against real Debian kernels booted under QEMU.

`initramfs` builds a tiny initramfs (busybox, the msr and cpuid modules, Debian's python3 and the guest agent),
`boot` boots one case under qemu-system-x86_64 with TCG and parses what the guest printed, `cases` lists the CPU
models and command lines, and `compare` sets each result beside pvmit's prediction for what that QEMU model shows
a guest (`vmm/personalities/qemu-tcg-*.toml`). docs/linux-guests.md describes the method and the results.
"""
