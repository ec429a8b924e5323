"""The guest's serial console: bytes written to COM1 (0x3f8) become lines of the transcript."""

from __future__ import annotations

from collections.abc import Callable

COM1 = 0x3F8
LSR = COM1 + 5
LSR_IDLE = 0x60  # THR empty and transmitter idle: a polling guest may always send


class Serial:
    """Collects output; calls `on_line` for each complete line. Bounded: a flooding guest cannot grow memory."""

    def __init__(self, on_line: Callable[[str], None] | None = None, max_line: int = 4096,
                 max_lines: int = 10_000) -> None:
        self.lines: list[str] = []
        self._buf = bytearray()
        self._on_line = on_line
        self._max_line = max_line
        self._max_lines = max_lines
        self.dropped = 0

    def write(self, data: bytes | memoryview) -> None:
        for byte in bytes(data):
            if byte == 10:
                self._flush()
            elif len(self._buf) < self._max_line:
                self._buf.append(byte)
            else:
                self.dropped += 1

    def _flush(self) -> None:
        line = self._buf.decode("ascii", "replace")
        self._buf.clear()
        if len(self.lines) < self._max_lines:
            self.lines.append(line)
        else:
            self.dropped += 1
        if self._on_line:
            self._on_line(line)

    @property
    def partial(self) -> str:
        """The line written so far but not finished (it travels with a migrating guest)."""
        return self._buf.decode("ascii", "replace")

    @partial.setter
    def partial(self, text: str) -> None:
        self._buf = bytearray(text.encode("ascii", "replace")[: self._max_line])

    def close(self) -> None:
        if self._buf:
            self._flush()
