"""Who may talk to a VMM, decided on every accepted connection before anything else is read from it.

- Unix sockets: the peer's credentials (SO_PEERCRED) must be the VMM's own uid or root (the socket file is also
  mode 0600).
- TCP: mutual TLS (`pvmit.net.tls`); a client without a certificate from the VMM's CA fails the handshake.

Then the listener sends one byte: ACK (0x06), or NAK (0x15) and a line saying why. A client reads it before it sends
anything that matters, so a refused client learns why, and with TLS 1.3 (where the server checks the client's
certificate after the client thinks the handshake is done) no command or VM data leaves it before it is accepted.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from pvmit.errors import InputError
from pvmit.net.address import Address
from pvmit.net.text import shorten
from pvmit.net.tls import HOW, Credentials, describe_certificate

ACK, NAK = b"\x06", b"\x15"
MAX_REASON = 512


class Refused(ConnectionError):
    """This end refused the peer (the reason was sent to it where possible, and should be logged)."""


class PeerRefused(ConnectionError):
    """The other end refused us; the message carries its reason."""


@dataclass
class Peer:
    """An accepted or connected, authenticated connection: `sock` (plain or TLS) and who is at the other end."""

    sock: socket.socket
    who: str


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket, from the kernel (SO_PEERCRED)."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return pid, uid


def _nak(sock: socket.socket, reason: str) -> None:
    try:
        sock.settimeout(1)
        sock.sendall(NAK + reason.encode("utf-8", "replace")[:MAX_REASON] + b"\n")
    except OSError:
        pass


def _admit(sock: socket.socket, who: str, claim: Callable[[], str | None], deadline: float) -> Peer:
    """An authenticated peer: refused with `claim()`'s reason, if it gives one, else accepted (ACK)."""
    busy = claim()
    if busy:
        _nak(sock, busy)
        raise Refused(f"refused {who}: {busy}")
    sock.settimeout(_remaining(deadline))
    sock.sendall(ACK)
    return Peer(sock, who)


def accept(conn: socket.socket, addr: object, creds: Credentials | None, *, deadline: float,
           claim: Callable[[], str | None] = lambda: None) -> Peer:
    """Authenticate a connection just accepted on a listening socket. Raises Refused (conn closed) if the peer
    may not talk to this VMM or does not complete the handshake by `deadline`. Then `claim()` is asked: a reason
    (this VMM is busy, or has too many connections) refuses the authenticated peer with that message (NAK)."""
    try:
        if conn.family == socket.AF_UNIX:
            pid, uid = peer_uid(conn)
            who = f"uid {uid} pid {pid}"
            if uid not in (os.geteuid(), 0):
                _nak(conn, f"permission denied: {who} is neither this VMM's owner (uid {os.geteuid()}) nor root")
                raise Refused(f"refused {who}: neither this VMM's owner nor root")
            return _admit(conn, who, claim, deadline)
        host = addr[0] if isinstance(addr, tuple) else "?"
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small answers go now, not after an ACK
        if creds is None:  # never reached: a TCP endpoint is not opened without credentials
            raise Refused(f"refused {host}: TCP without TLS")
        tls = creds.server_context().wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        conn = tls
        try:
            tls.settimeout(_remaining(deadline))
            tls.do_handshake()
        except ssl.SSLError as e:
            raise Refused(f"refused {host}: TLS handshake failed: {e.reason or e}") from None
        return _admit(tls, f"{host} ({describe_certificate(tls)})", claim, deadline)
    except Refused:
        conn.close()
        raise
    except (OSError, ValueError) as e:  # timeouts, resets, a peer that went away
        conn.close()
        what = "timed out" if isinstance(e, TimeoutError) else shorten(str(e) or type(e).__name__)
        raise Refused(f"connection dropped before it was authenticated: {what}") from None


def connect(address: Address, creds: Credentials | None, *, timeout: float = 10.0) -> Peer:
    """Connect to a VMM endpoint and wait until it accepts us. Plain TCP is refused here, before connecting."""
    if address.is_tcp and creds is None:
        where = "" if address.is_loopback else " (not a loopback address)"
        raise InputError(f"{address}{where}: pvmit speaks TCP only over mutual TLS; {HOW}")
    deadline = time.monotonic() + timeout
    sock = address.connect(timeout)
    try:
        if address.is_tcp:
            assert creds is not None
            tls = creds.client_context().wrap_socket(sock, server_hostname=address.host,
                                                     do_handshake_on_connect=False)
            sock = tls
            try:
                tls.settimeout(_remaining(deadline))
                tls.do_handshake()
            except ssl.SSLCertVerificationError as e:
                raise ConnectionError(f"{address}: its certificate is not trusted: "
                                      f"{e.verify_message or e.reason}") from None
            except ssl.SSLError as e:
                raise PeerRefused(f"{address}: TLS handshake failed: {e.reason or e}") from None
        sock.settimeout(_remaining(deadline))
        try:
            first = sock.recv(1)
        except ssl.SSLError as e:
            raise PeerRefused(f"{address} refused our certificate: {e.reason or e}") from None
        if first == ACK:
            return Peer(sock, str(address))
        if first == NAK:
            reason = sock.recv(MAX_REASON).decode("utf-8", "replace").strip()
            raise PeerRefused(f"{address} refused the connection: {shorten(reason)}")
        if not first:
            raise PeerRefused(f"{address} closed the connection without accepting it")
        raise PeerRefused(f"{address} is not a pvmit endpoint (it sent {first!r} first)")
    except TimeoutError:
        sock.close()
        raise ConnectionError(f"{address}: no answer within {timeout:g} s") from None
    except (ConnectionError, InputError):
        sock.close()
        raise
    except OSError as e:
        sock.close()
        raise ConnectionError(f"{address}: {e.strerror or e}") from None


__all__ = ["ACK", "NAK", "Peer", "PeerRefused", "Refused", "accept", "connect", "peer_uid"]
