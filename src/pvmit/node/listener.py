"""A listening endpoint of the VMM process: accept, authenticate, hand over, within bounds.

Each accepted connection gets a thread of its own, which authenticates the peer (`pvmit.net.peer.accept`: uid for
Unix sockets, mutual TLS for TCP) within a deadline and then runs the handler. At most `limit` connections are
served at once; past that, a few short-lived refusers tell newcomers so ("too many connections") and anything
beyond them is closed at once, so a flood of clients costs neither unbounded threads nor memory. Refusals are
logged, at most a few per second (with a count of those not shown).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from pvmit.net.address import Address
from pvmit.net.peer import Peer, Refused, accept
from pvmit.net.tls import Credentials

REFUSERS = 4
REFUSE_SECONDS = 2.0


class RateLimitedLog:
    """At most `burst` messages per `period` seconds; the rest are counted and reported with the next one shown."""

    def __init__(self, say: Callable[[str], None], burst: int = 5, period: float = 10.0) -> None:
        self.say, self.burst, self.period = say, burst, period
        self._window, self._shown, self._hidden = 0.0, 0, 0
        self._lock = threading.Lock()

    def __call__(self, message: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._window > self.period:
                self._window, self._shown = now, 0
            if self._shown >= self.burst:
                self._hidden += 1
                return
            self._shown += 1
            hidden, self._hidden = self._hidden, 0
        self.say(message + (f" ({hidden} similar messages not shown)" if hidden else ""))


class Listener:
    def __init__(self, address: Address, creds: Credentials | None, handle: Callable[[Peer], None],
                 say: Callable[[str], None], *, name: str, limit: int = 16, auth_seconds: float = 10.0) -> None:
        self.address, self.creds, self.handle, self.name = address, creds, handle, name
        self.limit, self.auth_seconds = limit, auth_seconds
        self.log = RateLimitedLog(say)
        self.sock = address.listen()
        self._slots = threading.BoundedSemaphore(limit)
        self._refusers = threading.BoundedSemaphore(REFUSERS)
        self._closed = False
        self._count = threading.Lock()
        self.active = 0
        self.refused = 0
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)
        self._thread.start()

    @property
    def protection(self) -> str:
        if self.address.is_tcp:
            assert self.creds is not None
            return f"mutual TLS, clients need a certificate from {self.creds.directory / 'ca-cert.pem'}"
        return "Unix socket mode 0600, peers checked by SO_PEERCRED: this VMM's uid or root only"

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                if self._closed:
                    return  # closed: the process is ending
                time.sleep(0.05)  # EMFILE and the like: try again, never spin
                continue
            if self._slots.acquire(blocking=False):
                threading.Thread(target=self._serve, args=(conn, addr), name=f"{self.name}-conn",
                                 daemon=True).start()
            elif self._refusers.acquire(blocking=False):
                threading.Thread(target=self._refuse, args=(conn, addr), name=f"{self.name}-refuse",
                                 daemon=True).start()
            else:
                conn.close()
                self.refused += 1
                self.log(f"vmm: {self.name}: connection closed unanswered: {self.limit} connections are being "
                         "served and as many refused")

    def _serve(self, conn: socket.socket, addr: object) -> None:
        with self._count:
            self.active += 1
        try:
            try:
                peer = accept(conn, addr, self.creds, deadline=time.monotonic() + self.auth_seconds)
            except Refused as e:
                self.refused += 1
                self.log(f"vmm: {self.name}: {e}")
                return
            try:
                self.handle(peer)
            finally:
                try:
                    peer.sock.close()
                except OSError:
                    pass
        finally:
            with self._count:
                self.active -= 1
            self._slots.release()

    def _refuse(self, conn: socket.socket, addr: object) -> None:
        try:
            accept(conn, addr, self.creds, deadline=time.monotonic() + REFUSE_SECONDS,
                   claim=lambda: f"too many connections ({self.limit} being served); try again later")
        except Refused as e:
            self.refused += 1
            self.log(f"vmm: {self.name}: {e}")
        finally:
            self._refusers.release()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.address.unlink()


__all__ = ["Listener", "RateLimitedLog"]
