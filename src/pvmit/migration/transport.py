"""Sockets for migration and control: Unix sockets or loopback TCP only, framed by `stream`."""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass

from pvmit.errors import InputError
from pvmit.migration.stream import Header, Section, StreamDecoder, StreamError

RECV_CHUNK = 1 << 20


@dataclass(frozen=True)
class Address:
    """`unix:/path` or `tcp:127.0.0.1:PORT` (loopback only: migration traffic stays on this machine)."""

    family: int
    target: str | tuple[str, int]

    @classmethod
    def parse(cls, text: str) -> Address:
        if text.startswith("unix:"):
            path = text[len("unix:"):]
            if not path:
                raise InputError(f"{text!r}: a Unix socket address needs a path (unix:/run/pvmit/dst.sock)")
            return cls(socket.AF_UNIX, path)
        if text.startswith("tcp:"):
            host, _, port = text[len("tcp:"):].rpartition(":")
            if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
                raise InputError(f"{text!r}: only loopback TCP addresses are allowed (127.0.0.1, ::1)")
            try:
                p = int(port)
            except ValueError:
                raise InputError(f"{text!r}: {port!r} is not a port number") from None
            if not 0 < p < 65536:
                raise InputError(f"{text!r}: port {p} is out of range")
            fam = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
            return cls(fam, (host.strip("[]").replace("localhost", "127.0.0.1"), p))
        raise InputError(f"{text!r}: an address is unix:/path or tcp:127.0.0.1:PORT")

    def __str__(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"unix:{self.target}"
        assert isinstance(self.target, tuple)
        host, port = self.target
        return f"tcp:{host}:{port}"

    def listen(self) -> socket.socket:
        """A listening socket. A Unix socket is created mode 0600. A Unix socket path left by a process that died is
        replaced; a path that is not a socket, or a socket something still listens on, is an error rather than
        something to delete."""
        if self.family == socket.AF_UNIX:
            self._clear_stale(str(self.target))
        s = socket.socket(self.family, socket.SOCK_STREAM)
        if self.family != socket.AF_UNIX:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        old_umask = os.umask(0o177) if self.family == socket.AF_UNIX else None
        try:
            s.bind(self.target)  # a Unix socket is created 0600: only its owner may command or feed this VMM
            s.listen(4)
        except OSError as e:
            s.close()
            raise InputError(f"cannot listen at {self}: {e.strerror or e}") from None
        finally:
            if old_umask is not None:
                os.umask(old_umask)
        return s

    def _clear_stale(self, path: str) -> None:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise InputError(f"cannot listen at {self}: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: left behind by a process that is gone
            return
        except OSError:
            return  # let bind() report it
        finally:
            probe.close()
        raise InputError(f"cannot listen at {self}: another process is listening there")

    def unlink(self) -> None:
        """Remove a Unix socket's path (after closing the listening socket); nothing for TCP."""
        if self.family == socket.AF_UNIX:
            try:
                os.unlink(str(self.target))
            except FileNotFoundError:
                pass

    def connect(self, timeout: float = 10.0) -> socket.socket:
        s = socket.socket(self.family, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.target)
        except OSError as e:
            s.close()
            raise ConnectionError(f"cannot connect to {self}: {e.strerror or e}") from None
        return s


class PeerClosed(ConnectionError):
    """The peer closed the connection cleanly between messages."""


class Channel:
    """A socket carrying the migration stream: send encoded bytes, receive decoded events."""

    def __init__(self, sock: socket.socket, *, expect_header: bool, timeout: float = 30.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.decoder = StreamDecoder(expect_header=expect_header)
        self.sent = 0
        self.received = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def receive(self) -> Header | Section:
        """The next header or section; PeerClosed on a clean close, StreamError on a cut or corrupt stream."""
        while True:
            event = self.decoder.next_event()
            if event is not None:
                return event
            try:
                data = self.sock.recv(RECV_CHUNK)
            except TimeoutError:
                raise ConnectionError("timed out waiting for the peer") from None
            if not data:
                self.decoder.end()  # raises StreamError if something was cut short
                raise PeerClosed("the peer closed the connection")
            self.received += len(data)
            self.decoder.feed(data)

    def expect(self, *kinds: bytes) -> Section:
        event = self.receive()
        if isinstance(event, Header):
            raise StreamError("unexpected second stream header")
        if event.kind not in kinds:
            raise StreamError(f"expected {' or '.join(k.decode() for k in kinds)}, got {event.kind.decode()} "
                              f"at byte {event.offset}")
        return event

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
