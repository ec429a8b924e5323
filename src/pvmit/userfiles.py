"""Files a user names: read only what is expected there (a regular file, or the device a /dev/cpu path must be)
and at most a stated number of bytes; parse JSON and TOML with limits on nesting and numbers; write outputs whole
or not at all.

Why: a catalog or inventory that is a link to /dev/zero would grow memory without bound, a FIFO would block the
read forever, and a document nested ten thousand levels deep, an integer of 5000 digits or a lone surrogate in a
string would end in a traceback far from the file. Every reader in pvmit (catalog and personality files,
inventories, host facts, /sys and /proc, the agent's devices) goes through here, so the rule exists once.
Standard library only: the guest agent ships this file.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pvmit.errors import InputError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MAX_DEPTH = 64
"""Deepest nesting of arrays and objects read from JSON or TOML (pvmit's own documents need fewer than 8)."""
MAX_INT_DIGITS = 100
"""Longest integer read from JSON (pvmit's values are 64-bit: at most 20 digits)."""

StrPath = str | os.PathLike[str]


class FileError(InputError):
    """A file cannot be used: `errno` is set where the system refused (missing, permissions), None where pvmit
    refused it (wrong kind, too large, not UTF-8, malformed)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def size_text(n: int) -> str:
    """Bytes for people: 64 KiB, 512 MiB, 1 GiB, 3.5 GiB."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit:
            return f"{n / unit:.1f}".removesuffix(".0") + f" {name}"
    return f"{n} bytes"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def _oserror(path: StrPath, what: str, e: OSError) -> FileError:
    return FileError(f"{os.fspath(path)}: cannot read {what}: {e.strerror or e}", e.errno)


def _check_kind(path: StrPath, what: str, mode: int, device: bool) -> None:
    if stat.S_ISREG(mode) or (device and stat.S_ISCHR(mode)):
        return
    want = "a character device" if device else "a regular file"
    raise FileError(f"{os.fspath(path)}: {what} must be {want}, and this is {_kind(mode)}")


def open_checked(path: StrPath, what: str, flags: int = os.O_RDONLY, *, device: bool = False) -> int:
    """A file descriptor for `path`, which must be a regular file (links to one are followed), or with device=True
    a character device (a regular file is accepted there too: it cannot block or grow a read of fixed size).
    Where a regular file is expected the kind is checked before the open too (opening a device can act on it);
    it is always checked on the descriptor (the path may have changed in between). O_NONBLOCK keeps a FIFO from
    blocking the open. `what` names the file in messages ("catalog file")."""
    try:
        if not device:
            _check_kind(path, what, os.stat(path).st_mode, device)
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise _oserror(path, what, e) from None
    try:
        _check_kind(path, what, os.fstat(fd).st_mode, device)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _too_large(path: StrPath, what: str, size: int | None, cap: int) -> FileError:
    got = f"is {size_text(size)}" if size is not None else "is larger than that"
    return FileError(f"{os.fspath(path)}: {what} {got}; pvmit reads at most {size_text(cap)} of it")


def read_bytes(path: StrPath, what: str, cap: int) -> bytes:
    """The contents of regular file `path`, refused (naming the cap) when larger than `cap` bytes. Reads at most
    cap + 1 bytes whatever the file claims, so a file that grows or lies about its size (/proc) is bounded too."""
    fd = open_checked(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise _too_large(path, what, size, cap)
        chunks, total = [], 0
        while total <= cap:
            chunk = os.read(fd, min(cap + 1 - total, max(size + 1 - total, 64 * KiB), 16 * MiB))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > cap:
            raise _too_large(path, what, None, cap)
        return b"".join(chunks)
    except OSError as e:
        raise _oserror(path, what, e) from None
    finally:
        os.close(fd)


def decode_utf8(data: bytes, where: str, what: str) -> str:
    """UTF-8 text or a FileError naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileError(f"{where}: {what} is not UTF-8 text: byte {e.start} ({data[e.start:e.start + 1]!r})") \
            from None


def read_text(path: StrPath, what: str, cap: int) -> str:
    """`read_bytes` decoded as UTF-8 (strictly: a file that is not text is refused, naming the byte)."""
    return decode_utf8(read_bytes(path, what, cap), os.fspath(path), what)


# --- parsing --------------------------------------------------------------------------------------------------

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _Refused(ValueError):
    pass


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {digits:,} digits (at most {MAX_INT_DIGITS} are read)")
    return int(text)


def _float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise _Refused(f"the number {text[:40]} is out of range")
    return v


def _constant(name: str) -> float:
    raise _Refused(f"{name} is not a JSON value")


def _check_depth(doc: Any, where: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH (a level at a time, without recursion)."""
    level, depth = [doc], 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise FileError(f"{where}: nested more than {MAX_DEPTH} levels deep")
        nxt: list[Any] = []
        for v in level:
            for x in v.values() if type(v) is dict else v:
                if type(x) is dict or type(x) is list:
                    nxt.append(x)
        level = nxt


def _check_strings(doc: Any, where: str) -> None:
    """Refuse a string or key that is not valid Unicode: a lone surrogate (JSON may spell one, "\\ud800", and
    writing it as UTF-8 later would fail), naming where it is (vms[3].name)."""
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        at, v = stack.pop()
        if type(v) is str:
            _check_string(v, where, at)
        elif type(v) is dict:
            for k, x in v.items():
                _check_string(k, where, at)
                stack.append((f"{at}.{k}" if at else k, x))
        elif type(v) is list:
            stack.extend((f"{at}[{i}]", x) for i, x in enumerate(v))


def _check_string(s: str, where: str, at: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        from pvmit.safetext import quoted

        raise FileError(f"{where}: {at or '(document)'}: {quoted(s)} is not valid Unicode text (a lone surrogate "
                        f"at character {e.start})") from None


def load_json(text: str, where: str) -> Any:
    """JSON from `text` (`where` names it in messages): not NaN or Infinity, no number out of range, no
    integer longer than MAX_INT_DIGITS, no nesting deeper than MAX_DEPTH, no lone surrogate in any string."""
    try:
        doc = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except json.JSONDecodeError as e:
        raise FileError(f"{where}: not valid JSON: {e}") from None
    except _Refused as e:
        raise FileError(f"{where}: not valid JSON: {e}") from None
    except RecursionError:
        raise FileError(f"{where}: not valid JSON: nested more than {MAX_DEPTH} levels deep") from None
    if type(doc) is dict or type(doc) is list:
        _check_depth(doc, where)
    if _SURROGATE_ESCAPE.search(text):  # a surrogate can only come from an escape: skip the walk otherwise
        _check_strings(doc, where)
    return doc


def read_json(path: StrPath, what: str, cap: int) -> Any:
    """`load_json` of regular file `path`, read with `read_text`."""
    return load_json(read_text(path, what, cap), os.fspath(path))


def load_toml(text: str, where: str) -> dict[str, Any]:
    """TOML from `text`: malformed TOML, integers beyond Python's conversion limit and nesting deeper than
    MAX_DEPTH (dotted keys nest without recursion in the parser) are refused naming `where`."""
    import tomllib  # only the readers of TOML pay for it

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FileError(f"{where}: not valid TOML: {e}") from None
    except RecursionError:
        raise FileError(f"{where}: not valid TOML: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # tomllib's int() of an integer longer than sys.get_int_max_str_digits()
        raise FileError(f"{where}: not valid TOML: {str(e).partition(';')[0]}") from None
    _check_depth(doc, where)  # tomllib refuses escapes of surrogates itself
    return doc


# --- writing --------------------------------------------------------------------------------------------------

def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


class Staging:
    """Output files written under temporary names beside their final ones and renamed into place together once
    everything is written; on any error the temporary files (and directories made for them) are removed, so an
    error leaves nothing behind. A final path that exists and is not a regular file (/dev/stdout, a FIFO) is
    written directly: nothing partial can be left there."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        self._made: list[Path] = []

    def directory(self, d: Path) -> None:
        """mkdir -p, remembering what it made (removed again on error if empty)."""
        missing = []
        p = d
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        d.mkdir(parents=True, exist_ok=True)
        self._made.extend(missing)

    def path(self, final: Path) -> Path:
        """Where to write what belongs at `final`."""
        try:
            st = os.stat(final)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(21, "is a directory", str(final))
            return final
        real = Path(os.path.realpath(final)) if st is not None else final
        tmp = _temporary(real)
        self._pending.append((tmp, real))
        return tmp

    def commit(self) -> None:
        mode = 0o666 & ~_umask()
        for tmp, final in self._pending:
            os.chmod(tmp, mode)
            os.replace(tmp, final)
        self._pending.clear()
        self._made.clear()

    def abort(self) -> None:
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        for d in self._made:  # deepest first
            try:
                d.rmdir()
            except OSError:
                pass
        self._pending.clear()
        self._made.clear()


def _temporary(final: Path) -> Path:
    """A new empty file beside `final`, hidden and named after it, created exclusively (so never someone else's:
    a link planted there is not followed)."""
    for n in range(1000):
        tmp = final.parent / f".{os.getpid()}-{n}.{final.name}"  # the suffix stays: writers choose by it
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(17, "too many temporary files", str(final))


@contextmanager
def staged() -> Iterator[Staging]:
    """`with staged() as s: write(s.path(final))`: all files in place at the end of the block, or none."""
    s = Staging()
    try:
        yield s
    except BaseException:
        s.abort()
        raise
    s.commit()


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` whole, or leave `path` as it was."""
    with staged() as s:
        target = s.path(path)
        with open(target, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
