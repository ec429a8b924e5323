"""Typed access to the JSON a migration peer sends: every field checked before use, every refusal naming it.

`need(doc, "vm.memory_size", int, lo=..., hi=...)` returns the value or raises a StreamError that says which
section, which field and what was wrong. `bool` is never taken for `int` (JSON true is not 1), floats never for
integers, and strings are checked for length and for characters that cannot be encoded (lone surrogates).
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

from pvmit.migration.stream import StreamError, Unusable
from pvmit.net.text import shorten

T = TypeVar("T")
MAX_STRING = 4096
_MISSING = object()


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Unusable):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return shorten(repr(value), 40)
    if isinstance(value, str):
        return f"a string ({shorten(repr(value), 60)})"
    kind = "list" if isinstance(value, list) else "object" if isinstance(value, dict) else type(value).__name__
    return f"a JSON {kind}"


def _lookup(doc: Any, path: str, where: str) -> Any:
    value = doc
    walked: list[str] = []
    for part in path.split("."):
        if not isinstance(value, dict):
            at = ".".join(walked) or "the document"
            raise StreamError(f"{where}: {at} must be an object, not {_describe(value)}")
        walked.append(part)
        value = value.get(part, _MISSING)
        if value is _MISSING:
            raise StreamError(f"{where}: field {'.'.join(walked)} is missing")
    return value


@overload
def need(doc: Any, path: str, kind: type[bool], *, where: str = ...) -> bool: ...
@overload
def need(doc: Any, path: str, kind: type[int], *, where: str = ..., lo: int | None = ...,
         hi: int | None = ...) -> int: ...
@overload
def need(doc: Any, path: str, kind: type[str], *, where: str = ..., max_len: int = ...) -> str: ...
@overload
def need(doc: Any, path: str, kind: type[dict[str, Any]], *, where: str = ...) -> dict[str, Any]: ...
@overload
def need(doc: Any, path: str, kind: type[list[Any]], *, where: str = ...) -> list[Any]: ...


def need(doc: Any, path: str, kind: type, *, where: str = "migration stream header", lo: int | None = None,
         hi: int | None = None, max_len: int = MAX_STRING) -> Any:
    """The value at dotted `path` in `doc`, of exactly `kind`, within [lo, hi] for integers."""
    value = _lookup(doc, path, where)
    return checked(value, path, kind, where=where, lo=lo, hi=hi, max_len=max_len)


def checked(value: Any, name: str, kind: type, *, where: str, lo: int | None = None, hi: int | None = None,
            max_len: int = MAX_STRING) -> Any:
    """`value` (called `name` in messages) checked as `need` checks a field."""
    wanted = {bool: "true or false", int: "an integer", str: "a string", dict: "an object", list: "a list"}[kind]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise StreamError(f"{where}: {name} must be {wanted}, not {_describe(value)}")
    if kind is int:
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise StreamError(f"{where}: {name} = {shorten(str(value), 40)} is out of range "
                              f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}")
    elif kind is str:
        if len(value) > max_len:
            raise StreamError(f"{where}: {name} is longer than {max_len} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise StreamError(f"{where}: {name} holds an unpaired surrogate (not valid Unicode)") from None
    return value


def optional(doc: dict[str, Any], key: str, kind: type, default: T, *, where: str, name: str | None = None,
             **limits: Any) -> Any:
    """A field that may be absent (then `default`); present, it is checked as `need` checks (and called `name`,
    by default `key`, in messages)."""
    if key not in doc:
        return default
    return checked(doc[key], name or key, kind, where=where, **limits)


__all__ = ["checked", "need", "optional"]
