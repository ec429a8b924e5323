"""os._exit in the test process: the faults that end a VMM on purpose (os._exit(9)) raise `Exited` instead, so a
test sees where the VMM would have died and with which code. A BaseException: no handler in the code under test
takes it."""

from __future__ import annotations

import os

import pytest


class Exited(BaseException):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def raise_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until the test ends, os._exit(code) raises Exited(code)."""
    def exit_(code: int) -> None:
        raise Exited(code)
    monkeypatch.setattr(os, "_exit", exit_)
