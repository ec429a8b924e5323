"""The pool rule (which speculation bits a pool of hosts may show its guests) and its output for QEMU, libvirt and
Firecracker. See docs/pools.md."""
