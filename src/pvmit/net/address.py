"""Endpoint addresses: `unix:/path` or `tcp:HOST:PORT`.

A TCP endpoint is always protected by mutual TLS (`pvmit.net.tls`): on loopback too, since any local user can
connect to a loopback port. Unix sockets are created mode 0600 and their peers are checked by uid
(`pvmit.net.peer`).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass

from pvmit.errors import InputError
from pvmit.net.text import shorten

MAX_ADDRESS = 512
BACKLOG = 64


class PeerGone(ConnectionError):
    """Nothing listens at a Unix socket address (refused, or the path is gone): the process that did has ended."""


@dataclass(frozen=True)
class Address:
    """A parsed endpoint. `host` is the name or IP a TCP client checks the server's certificate against."""

    family: int
    target: str | tuple[str, int]

    @classmethod
    def parse(cls, text: str) -> Address:
        shown = shorten(text)
        if len(text) > MAX_ADDRESS:
            raise InputError(f"{shown}: an address is at most {MAX_ADDRESS} characters")
        if text.startswith("unix:"):
            path = text[len("unix:"):]
            if not path or "\0" in path:
                raise InputError(f"{shown}: a Unix socket address needs a path (unix:/run/pvmit/dst.sock)")
            if len(os.fsencode(path)) > 107:
                raise InputError(f"{shown}: a Unix socket path is at most 107 bytes (the kernel's limit)")
            return cls(socket.AF_UNIX, path)
        if text.startswith("tcp:"):
            host, sep, port = text[len("tcp:"):].rpartition(":")
            if not sep or not host:
                raise InputError(f"{shown}: a TCP address is tcp:HOST:PORT (tcp:192.0.2.7:4444, tcp:[::1]:4444)")
            if not port.isascii() or not port.isdigit() or len(port) > 5:
                raise InputError(f"{shown}: {shorten(port, 20)!r} is not a port number")
            p = int(port)
            if not 0 < p < 65536:
                raise InputError(f"{shown}: port {p} is out of range 1-65535")
            bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            if not bare or not all(c.isascii() and (c.isalnum() or c in ".-:_") for c in bare):
                raise InputError(f"{shown}: {shorten(host, 80)!r} is not a host name or IP address")
            try:
                fam = socket.AF_INET6 if ipaddress.ip_address(bare).version == 6 else socket.AF_INET
            except ValueError:
                if ":" in bare:
                    raise InputError(f"{shown}: {shorten(host, 80)!r} is not an IP address") from None
                fam = socket.AF_INET  # a host name, resolved when used
            return cls(fam, (bare, p))
        raise InputError(f"{shown}: an address is unix:/path or tcp:HOST:PORT")

    @property
    def is_tcp(self) -> bool:
        return self.family != socket.AF_UNIX

    @property
    def host(self) -> str:
        return self.target[0] if isinstance(self.target, tuple) else "localhost"

    @property
    def is_loopback(self) -> bool:
        if not self.is_tcp:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    def __str__(self) -> str:
        if not isinstance(self.target, tuple):
            return f"unix:{self.target}"
        host, port = self.target
        return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"

    def listen(self) -> socket.socket:
        """A listening socket. A Unix socket is created mode 0600. A Unix socket path left by a process that died is
        replaced; a path that is not a socket, or a socket something still listens on, is an error rather than
        something to delete."""
        if not isinstance(self.target, tuple):
            self._clear_stale(self.target)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)  # created 0600: only its owner (and root) may even connect
            try:
                s.bind(self.target)
                s.listen(BACKLOG)
            except OSError as e:
                s.close()
                raise InputError(f"cannot listen at {self}: {e.strerror or e}") from None
            finally:
                os.umask(old_umask)
            return s
        try:
            infos = socket.getaddrinfo(self.target[0], self.target[1], self.family, socket.SOCK_STREAM)
            family, _, _, _, sockaddr = infos[0]
        except (OSError, IndexError) as e:
            raise InputError(f"cannot listen at {self}: {getattr(e, 'strerror', None) or e}") from None
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sockaddr)
            s.listen(BACKLOG)
        except OSError as e:
            s.close()
            raise InputError(f"cannot listen at {self}: {e.strerror or e}") from None
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
            probe.settimeout(2)
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
        if not isinstance(self.target, tuple):
            try:
                os.unlink(self.target)
            except FileNotFoundError:
                pass

    def connect(self, timeout: float = 10.0) -> socket.socket:
        """A connected plain socket (TLS, where needed, is put on by `pvmit.net.tls`)."""
        try:
            if isinstance(self.target, tuple):
                s = socket.create_connection(self.target, timeout=timeout)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small answers go now, not after an ACK
            else:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(timeout)
                try:
                    s.connect(self.target)
                except OSError:
                    s.close()
                    raise
        except OSError as e:
            gone = not self.is_tcp and e.errno in (errno.ECONNREFUSED, errno.ENOENT)
            raise (PeerGone if gone else ConnectionError)(f"cannot connect to {self}: {e.strerror or e}") from None
        return s


__all__ = ["Address", "PeerGone"]
