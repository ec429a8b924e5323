"""What every KVM handle shares: one file descriptor, closed once, by `close()`, a `with` block or collection."""

from __future__ import annotations

import os
from typing import Self


class FdHandle:
    fd: int = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            try:
                self.close()
            except (BufferError, ValueError, OSError):
                pass  # interpreter shutdown: nothing useful to say
