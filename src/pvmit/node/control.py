"""The VMM's control protocol: one JSON command per connection, answered by JSON lines.

Server side: each authenticated connection (see `listener`) reads one command line, at most 64 KiB within an
overall deadline, then hands a `Request` to the VMM's main thread and writes the answers the main thread posts
(events, then one final answer with "ok"). Only the connection's own thread ever touches its socket, so a client
that stops reading, hangs up early or never sends anything costs its own thread, never the VMM's. The client side
is `request()`.
"""

from __future__ import annotations

import json
import queue
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pvmit.errors import InputError, PvmitError
from pvmit.migration.stream import StreamError, loads
from pvmit.net.address import Address
from pvmit.net.peer import Peer, connect
from pvmit.net.text import shorten
from pvmit.net.tls import Credentials

MAX_LINE = 64 << 10
READ_SECONDS = 10.0
WRITE_SECONDS = 10.0
ANSWER_SECONDS = 3600.0
MAX_ANSWER_LINE = 4 << 20


@dataclass
class Request:
    """One command from one client. `reply` may be called from any thread, any number of times; the first
    answer with "ok" ends the conversation, later ones are dropped."""

    doc: dict[str, Any]
    who: str
    _answers: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue, repr=False)
    done: bool = False

    def reply(self, doc: dict[str, Any]) -> None:
        if self.done:
            return
        if "ok" in doc:
            self.done = True
        self._answers.put(doc)

    @property
    def cmd(self) -> str:
        return str(self.doc.get("cmd", ""))


def read_line(sock: socket.socket, limit: int, deadline: float) -> bytes:
    """One line (without its newline) read within `deadline` overall, at most `limit` bytes. InputError when the
    line is too long, TimeoutError at the deadline, ConnectionError when the peer closes first."""
    buf = bytearray()
    while True:
        nl = buf.find(b"\n")
        if nl >= 0:
            return bytes(buf[:nl])
        if len(buf) > limit:
            raise InputError(f"a command is one line of at most {limit} bytes")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete command within {READ_SECONDS:g} s")
        sock.settimeout(left)
        chunk = sock.recv(min(65536, limit + 1 - len(buf)) or 1)
        if not chunk:
            raise ConnectionError("closed before sending a whole command")
        buf += chunk


def parse_command(line: bytes) -> dict[str, Any]:
    """A command line as a JSON object with a string "cmd"; InputError otherwise."""
    try:
        doc = loads(line, "command")
    except StreamError as e:
        raise InputError(str(e)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cmd"), str):
        raise InputError('a command is a JSON object with a string "cmd"')
    return doc


class ControlHandler:
    """The per-connection side of the control socket: read, post to the main thread, write the answers."""

    def __init__(self, post: Callable[[Request], None], say: Callable[[str], None]) -> None:
        self.post, self.say = post, say

    def __call__(self, peer: Peer) -> None:
        sock = peer.sock
        try:
            line = read_line(sock, MAX_LINE, time.monotonic() + READ_SECONDS)
            request = Request(parse_command(line), peer.who)
        except InputError as e:
            self._write(sock, {"ok": False, "error": str(e)})
            return
        except (TimeoutError, ConnectionError, OSError) as e:
            self._write(sock, {"ok": False, "error": f"no command read: {shorten(str(e) or type(e).__name__)}"})
            return
        self.post(request)
        deadline = time.monotonic() + ANSWER_SECONDS
        while time.monotonic() < deadline:
            try:
                doc = request._answers.get(timeout=1.0)
            except queue.Empty:
                continue
            if not self._write(sock, doc):
                return  # the client is gone; the command goes on, its outcome is in the VMM's log
            if "ok" in doc:
                return

    @staticmethod
    def _write(sock: socket.socket, doc: dict[str, Any]) -> bool:
        try:
            sock.settimeout(WRITE_SECONDS)
            sock.sendall(json.dumps(doc).encode() + b"\n")
            return True
        except (OSError, ValueError):
            return False


def request(address: str | Address, doc: dict[str, Any], on_event: Callable[[dict[str, Any]], None] = lambda d: None,
            *, creds: Credentials | None = None, timeout: float = 600.0, connect_timeout: float = 10.0
            ) -> dict[str, Any]:
    """Send one command to a VMM's control socket; events go to `on_event`, the final answer is returned.
    ConnectionError when the VMM cannot be reached or stops answering within `timeout`."""
    addr = address if isinstance(address, Address) else Address.parse(address)
    peer = connect(addr, creds, timeout=connect_timeout)
    deadline = time.monotonic() + timeout
    with peer.sock as sock:
        try:
            sock.settimeout(connect_timeout)
            sock.sendall(json.dumps(doc).encode() + b"\n")
            buf = b""
            while True:
                line, buf = _next_line(sock, buf, deadline, addr)
                try:
                    answer = loads(line, f"the answer of {addr}")
                except StreamError as e:
                    raise PvmitError(str(e)) from None
                if not isinstance(answer, dict):
                    raise PvmitError(f"the answer of {addr} is not a JSON object")
                if "event" in answer:
                    on_event(answer)
                    continue
                return answer
        except TimeoutError:
            raise ConnectionError(f"the VMM at {addr} did not answer within {timeout:g} s") from None
        except OSError as e:
            if isinstance(e, ConnectionError):
                raise
            raise ConnectionError(f"{addr}: {e.strerror or e}") from None


def _next_line(sock: socket.socket, buf: bytes, deadline: float, addr: Address) -> tuple[bytes, bytes]:
    while b"\n" not in buf:
        if len(buf) > MAX_ANSWER_LINE:
            raise PvmitError(f"the VMM at {addr} sent an answer line longer than {MAX_ANSWER_LINE} bytes")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(min(left, 60.0))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            raise ConnectionError(f"the VMM at {addr} closed the control connection without an answer")
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    return line, rest


__all__ = ["ControlHandler", "Request", "parse_command", "read_line", "request"]
