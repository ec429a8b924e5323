"""Numbers given on the command line: every numeric option has a range, and the message for a bad value names
the option and the range and never echoes more than a few dozen characters of what was given.

Python's int() would also take Arabic-Indic digits, underscores and 5000-digit strings; these take ASCII only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from pvmit.errors import InputError
from pvmit.safetext import quoted

_DECIMAL = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_REGISTER = re.compile(r"0[xX][0-9a-fA-F]+|0[bB][01]+|[0-9]+")
_SIZE = re.compile(r"([0-9]+)\s*([kKmMgG]?)(?:i?[bB])?")
if TYPE_CHECKING:  # generic from click 8.2 on; subscripted for the type checker only
    _ParamType = click.ParamType[Any]
else:
    _ParamType = click.ParamType
MAX_TEXT = 80
"""Longest numeric text read (leading zeros included); anything longer is refused unread."""


class BoundedInt(click.IntRange):
    """A decimal integer (ASCII digits) from `low` to `high`; click shows the range in --help and names the option
    and the range when a value is outside it."""

    def __init__(self, low: int, high: int) -> None:
        super().__init__(low, high)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if len(text) > MAX_TEXT or not _DECIMAL.fullmatch(text):
                self.fail(f"{quoted(text)} is not an integer ({self._describe_range()})", param, ctx)
            value = int(text)
        return super().convert(value, param, ctx)


class BoundedFloat(click.FloatRange):
    """A finite decimal number (ASCII) from `low` to `high`; NaN, which compares false with both bounds, and the
    infinities are refused."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__(low, high)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if len(text) > MAX_TEXT or not _FLOAT.fullmatch(text):
                self.fail(f"{quoted(text)} is not a number ({self._describe_range()})", param, ctx)
            value = float(text)
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(f"{value} is not a number in the range {self._describe_range()}", param, ctx)
        return super().convert(value, param, ctx)


class Converted(_ParamType):
    """A value turned into its type by one of pvmit's parsers; its InputError becomes click's message, which
    names the option."""

    def __init__(self, parse: Callable[[str], Any], name: str) -> None:
        self.parse, self.name = parse, name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.parse(value)
        except InputError as e:
            self.fail(str(e), param, ctx)


def parse_register_value(text: str, bits: int = 64) -> int:
    """A raw register value: decimal, 0x hex or 0b binary, ASCII digits only, below 2**bits."""
    t = text.strip()
    if len(t) > MAX_TEXT or not _REGISTER.fullmatch(t):
        raise InputError(f"{quoted(t)} is not a number (use decimal, 0x... or 0b..., ASCII digits only)")
    v = int(t, 0) if t[:2].lower() in ("0x", "0b") else int(t)
    if v >= 1 << bits:
        raise InputError(f"{quoted(t)} does not fit in {bits} bits")
    return v


def parse_size(text: str, what: str) -> int:
    """A size in bytes: 64M, 512MiB, 1G, 4096 (ASCII digits)."""
    m = _SIZE.fullmatch(text.strip()) if len(text) <= MAX_TEXT else None
    if m is None:
        raise InputError(f"{what}: {quoted(text)} is not a size (for example 64M or 512M)")
    return int(m[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m[2].lower()]
