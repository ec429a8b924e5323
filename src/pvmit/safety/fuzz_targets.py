"""Fuzz targets: every parser of outside input, with the one error type each may raise.

Each target takes arbitrary bytes. It must return normally or raise its documented error (whose message names what
was wrong); anything else (another exception, a hang, unbounded memory) is a bug. The same targets run under
hypothesis in the test suite and under atheris in tools/fuzz.py; inputs that once crashed one are kept in
tests/fixtures/crashers/<target>/ and replayed by the tests.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvmit.agent.errors import AgentError
from pvmit.catalog.loader import load_catalog
from pvmit.errors import InputError, PvmitError
from pvmit.migration.stream import Header, Section, StreamDecoder, StreamError, decode_pages
from pvmit.oracle.boot import BootFailed

MAX_INPUT = 1 << 20


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def stream(data: bytes) -> None:
    """The migration stream decoder, fed in uneven chunks, then each section's contents."""
    d = StreamDecoder()
    step = 1 + (data[0] % 61 if data else 0)
    for i in range(0, len(data), step):
        d.feed(data[i:i + step])
        while True:
            e = d.next_event()
            if e is None:
                break
            if isinstance(e, Section):
                if e.kind == b"MEMP":
                    decode_pages(e)
                else:
                    e.json()
            else:
                assert isinstance(e, Header)
    d.end()


def interface_state(data: bytes) -> None:
    """A destination's reading of an interface-state section (HELO/ISTA): JSON, then prepare and finish."""
    from pvmit.catalog.loader import load_catalog as _lc
    from pvmit.interface.state import finish, prepare

    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return  # the stream layer reports bad JSON; see `stream`
    host = _CATALOG().get("sapphirerapids").facts
    _ = _lc
    finish(prepare(doc, host), doc)


def personality(data: bytes) -> None:
    """A personality as a migration header carries it."""
    from pvmit.vmm.personality import Personality

    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return
    try:
        Personality.from_json(doc)
    except ValueError as e:
        raise InputError(str(e)) from None


def catalog_file(data: bytes) -> None:
    """An operator's catalog file (TOML)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "operator.toml"
        p.write_bytes(data)
        load_catalog([p])


def personality_template(data: bytes) -> None:
    from pvmit.vmm.personality import load_template

    load_template(_CATALOG(), "fuzz.toml", _text(data))


def kernel_cmdline(data: bytes) -> None:
    from pvmit.linux.model import Cmdline

    Cmdline.parse(_text(data))


def sysfs_line(data: bytes) -> None:
    """A spectre_v2 line as the kernel (or anyone) wrote it: parsing never fails, it only says 'unknown'."""
    from pvmit.linux.spectre_v2 import parse_spectre_v2

    parse_spectre_v2(_text(data))


def guest_msrs(data: bytes) -> None:
    """Guest RDMSR/WRMSR of anything: the core answers a value or #GP, and never raises."""
    from pvmit.interface import Form, InterfaceConfig, OperatorSettings, VmInterface
    from pvmit.safety.verify import promise_violations

    cat = _CATALOG()
    form = list(Form)[data[0] % 3] if data else Form.INTEL
    vm = VmInterface(InterfaceConfig(form, 3), cat.get("sapphirerapids").facts, cat.get("icelake-sp").facts,
                     OperatorSettings(), 2)
    for i in range(0, len(data) - 12, 13):
        vcpu = data[i] & 1
        index = int.from_bytes(data[i + 1:i + 5], "little")
        index = [0x48, 0x10A, 0x50000000, 0x50000001, 0x50000002, 0x4B564D80][index % 6] if data[i] & 2 else index
        value = int.from_bytes(data[i + 5:i + 13], "little")
        if data[i] & 4:
            vm.rdmsr(vcpu, index)
        else:
            vm.wrmsr(vcpu, index, value)
        vm.take_effects()
        assert not promise_violations(vm)


def _plan(paths: list[Path]) -> None:
    """Read an inventory, collapse it into classes and plan it, as `pvmit fleet plan` does."""
    from pvmit.fleet.classes import Resolver, collapse
    from pvmit.fleet.inventory import read_inventory
    from pvmit.fleet.plan import plan

    plan(collapse(read_inventory(paths), Resolver(_CATALOG())))


def inventory_json(data: bytes) -> None:
    """A whole fleet inventory as one JSON file."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "inventory.json"
        p.write_bytes(data)
        _plan([p])


def _two_tables(data: bytes, ext: str) -> None:
    """The first byte picks which table the rest of the input is (hosts or VMs); the other is a small valid one."""
    with tempfile.TemporaryDirectory() as d:
        fuzzed, fixed = ("hosts", "vms") if data[:1] and data[0] & 1 else ("vms", "hosts")
        (Path(d) / f"{fuzzed}{ext}").write_bytes(data[1:])
        (Path(d) / f"{fixed}{ext}").write_bytes(small_tables(ext)[fixed])
        _plan([Path(d)])


def inventory_csv(data: bytes) -> None:
    _two_tables(data, ".csv")


def inventory_parquet(data: bytes) -> None:
    _two_tables(data, ".parquet")


def small_tables(ext: str) -> dict[str, bytes]:
    """A hosts table and a VMs table (the first rows of the shipped sample) as `ext` file contents."""
    if ext not in _tables_cache:
        from importlib import resources

        import pyarrow as pa

        from pvmit.fleet.inventory import write_table

        doc = json.loads((resources.files("pvmit.fleet") / "data" / "sample-inventory.json").read_text())
        out = {}
        with tempfile.TemporaryDirectory() as d:
            for t in ("hosts", "vms"):
                rows = doc[t][:12]
                cols = sorted({k for r in rows for k in r})
                table = pa.table({c: [r.get(c) for r in rows] for c in cols})
                p = Path(d) / f"{t}{ext}"
                write_table(table, p)
                out[t] = p.read_bytes()
        _tables_cache[ext] = out
    return _tables_cache[ext]


_tables_cache: dict[str, dict[str, bytes]] = {}
def agent_decision(data: bytes) -> None:
    """The guest agent's reading of a spectre_v2 line and a kernel command line (first line, the rest)."""
    from pvmit.agent.decide import decide

    line, _, cmdline = _text(data).partition("\n")
    decide(line, cmdline)


class _HostileMsr:
    """RDMSR/WRMSR answered from the fuzz input: a value or #GP per MSR; writes refused, ignored or kept."""

    def __init__(self, values: dict[int, int | None], accept: int) -> None:
        self.values, self.accept = values, accept

    def read(self, cpu: int, index: int) -> int | None:
        return self.values.get(index)

    def write(self, cpu: int, index: int, value: int) -> None:
        from pvmit.agent.msrdev import write_faulted

        if self.accept == 0:
            raise write_faulted(cpu, index, value)
        if self.accept == 1:
            self.values[index] = value


class _HostileGuest:
    """A guest whose hypervisor answers CPUID and the interface's MSRs from the fuzz input (`agent_hypervisor`)."""

    LEAVES = (0, 1, 7, 0x80000000, 0x80000008, 0x80000021, 0x40000000, 0x40000001, 0x40000100, 0x40000101)
    MSRS = (0x10A, 0x50000000, 0x50000001, 0x50000002, 0x4B564D80)

    def __init__(self, data: bytes) -> None:
        w = [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data) - 3, 4)] or [0]
        self.table = {leaf: (w[4 * n % len(w)], w[(4 * n + 1) % len(w)], w[(4 * n + 2) % len(w)],
                             w[(4 * n + 3) % len(w)]) for n, leaf in enumerate(self.LEAVES)}
        values: dict[int, int | None] = {}
        for n, m in enumerate(self.MSRS):
            hi, lo = w[(40 + 2 * n) % len(w)], w[(41 + 2 * n) % len(w)]
            values[m] = (hi << 32 | lo) if hi % 5 else None  # some MSRs fault
        self._msr = _HostileMsr(values, w[-1] % 3)
        self.cpus = [0, 1] if w[0] & 1 else [0]

    def euid(self) -> int:
        return 0

    def release(self) -> str:
        return "fuzz"

    def read(self, path: str) -> str | None:
        return "Mitigation: Retpolines; BHI: SW loop, KVM: SW loop" if "spectre_v2" in path else ""

    def cpuid(self) -> tuple[Callable[[int, int], tuple[int, int, int, int]], str]:
        def cpuid(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
            return self.table.get(leaf, (0, 0, 0, 0))
        return cpuid, "fuzz"

    def msr(self) -> _HostileMsr:
        return self._msr

    def online_cpus(self) -> list[int]:
        return self.cpus

    def lockdown(self) -> str | None:
        return None

    def allow_writes(self) -> str | None:
        return None


def agent_hypervisor(data: bytes) -> None:
    """The guest agent against a hostile or broken hypervisor (CPUID leaves, MSR values, refused or ignored
    writes from the input): it must end with one of its exit statuses and one JSON document, never an exception."""
    import io

    from pvmit.agent.errors import Status
    from pvmit.agent.main import main

    out = io.StringIO()
    code = main(["report", "--json"], machine=_HostileGuest(data), out=out, err=io.StringIO())
    assert code in {int(s) for s in Status}, code
    assert json.loads(out.getvalue())["outcome"]["status"] == code


def oracle_serial(data: bytes) -> None:
    """What a guest printed on its serial console, as the Linux oracle reads it."""
    from pvmit.oracle.boot import parse

    parse(_text(data))


def cpu_list(data: bytes) -> None:
    """/sys/devices/system/cpu/online as the agent reads it."""
    from pvmit.agent.msrdev import parse_cpu_list

    parse_cpu_list(_text(data))


def json_document(data: bytes) -> None:
    """Any JSON file pvmit reads (`userfiles.load_json`): whatever it returns can be written back as UTF-8 JSON
    and walked without recursion errors (nesting, huge numbers and lone surrogates are refused at load)."""
    from pvmit.userfiles import load_json

    doc = load_json(data.decode("utf-8", "surrogatepass"), "fuzz.json") if _is_text(data) else None
    json.dumps(doc, allow_nan=False).encode("utf-8")
    repr(doc)


def toml_document(data: bytes) -> None:
    """Any TOML file pvmit reads (`userfiles.load_toml`), with the same promise as `json_document`."""
    from pvmit.userfiles import load_toml

    doc = load_toml(_text(data), "fuzz.toml")
    json.dumps(doc, default=str).encode("utf-8")


def _is_text(data: bytes) -> bool:
    try:
        data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return False
    return True


def host_facts(data: bytes) -> None:
    """A host's `cpu` cell of an inventory given as inline facts JSON (`pvmit host --json`'s)."""
    from pvmit.fleet.classes import Resolver

    try:
        Resolver(_CATALOG()).host_cpu("{" + _text(data).lstrip("{"), Path("."))
    except ValueError as e:
        raise InputError(str(e)) from None


def shown_text(data: bytes) -> None:
    """Text from outside as pvmit shows it (`safetext`): no control, bidi or invisible character and no lone
    surrogate survives, it can always be written as UTF-8, and a shortened value stays short."""
    import unicodedata

    from pvmit.safetext import DEFAULT_LIMIT, clean_message, safe_text, shorten

    text = data.decode("utf-8", "surrogateescape") + data.decode("utf-16-le", "surrogatepass" if len(data) % 2 == 0
                                                                 else "replace")
    for shown, lines in ((safe_text(text), False), (clean_message(text), True), (shorten(text), False)):
        shown.encode("utf-8")
        bad = [c for c in shown if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")
               and not (lines and c in "\n\t")]
        assert not bad, bad
    assert len(shorten(text)) <= 4 * (DEFAULT_LIMIT + 1) + 32  # an escape is at most 10 characters for one


def option_numbers(data: bytes) -> None:
    """A numeric command-line value (register value, size, bounded integer or number): a value in range, or
    the one documented error with a short message."""
    import click

    from pvmit.cli.params import BoundedFloat, BoundedInt, parse_register_value, parse_size

    text = data.decode("utf-8", "surrogateescape")
    for parse in (parse_register_value, lambda t: parse_size(t, "size"),
                  lambda t: BoundedInt(1, 10 ** 9).convert(t, None, None),
                  lambda t: BoundedFloat(5, 3600).convert(t, None, None)):
        try:
            parse(text)
        except (InputError, click.BadParameter) as e:
            if len(str(e)) > 300:
                raise AssertionError(f"a message of {len(str(e))} characters") from None
            continue


_catalog_cache: list[Any] = []


def _CATALOG() -> Any:  # noqa: N802 - a lazily built constant
    if not _catalog_cache:
        _catalog_cache.append(load_catalog())
    return _catalog_cache[0]


TARGETS: dict[str, tuple[Callable[[bytes], None], tuple[type[BaseException], ...]]] = {
    "stream": (stream, (StreamError,)),
    "interface_state": (interface_state, (InputError,)),
    "personality": (personality, (InputError,)),
    "catalog_file": (catalog_file, (InputError,)),
    "personality_template": (personality_template, (InputError,)),
    "kernel_cmdline": (kernel_cmdline, (InputError,)),
    "sysfs_line": (sysfs_line, ()),
    "guest_msrs": (guest_msrs, ()),
    "inventory_json": (inventory_json, (InputError,)),
    "inventory_csv": (inventory_csv, (InputError,)),
    "inventory_parquet": (inventory_parquet, (InputError,)),
    "agent_decision": (agent_decision, ()),
    "agent_hypervisor": (agent_hypervisor, ()),
    "oracle_serial": (oracle_serial, (BootFailed,)),
    "cpu_list": (cpu_list, (AgentError,)),
    "json_document": (json_document, (InputError,)),
    "toml_document": (toml_document, (InputError,)),
    "host_facts": (host_facts, (InputError,)),
    "shown_text": (shown_text, ()),
    "option_numbers": (option_numbers, ()),
}
"""name -> (target, the errors it may raise)."""


def run(name: str, data: bytes) -> None:
    """Run one target on one input; raise only if the target broke its contract."""
    target, allowed = TARGETS[name]
    try:
        target(data[:MAX_INPUT])
    except allowed as e:
        if not str(e):
            raise AssertionError(f"{name}: {type(e).__name__} without a message") from e
    except PvmitError as e:
        raise AssertionError(f"{name}: raised {type(e).__name__} ({e}), which it does not document") from e
