"""Network endpoints shared by the VMM's control socket and migration: addresses, who may connect, and TLS.

Below `migration` and `node`; imports nothing of pvmit but its errors and `safetext` (text made safe to show).
"""
