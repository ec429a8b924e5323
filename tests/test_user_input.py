"""Files and command-line values from users (issue 13): every reader takes only a regular file (or the device a
/dev/cpu path must be) of bounded size, JSON and TOML are read with limits, numeric options have ranges, text
from outside is escaped and shortened before it is shown, and an error leaves no partial output behind.

Readers that could hang on a FIFO or grow without bound on /dev/zero run in a child process with a timeout and a
memory limit, so a regression fails here instead of hanging the suite or the machine."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import click
import pytest

from pvmit.cli.params import BoundedFloat, BoundedInt, parse_register_value
from pvmit.errors import InputError
from pvmit.safetext import clean_message, quoted, safe_text, shorten
from pvmit.userfiles import FileError, load_json, load_toml, read_bytes, read_text, staged, write_atomic

SAMPLE = Path(__file__).resolve().parent.parent / "src/pvmit/fleet/data/sample-inventory.json"
HOSTILE_NAME = "\x1b[31mRED\x1b]0;pwned\x07\u202eevil"


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def child(script: str, *args: str, timeout: float = 60) -> str:
    """Run `script` in a fresh interpreter under a 6 GiB address-space limit; its output (a hang fails the test
    through TimeoutExpired)."""
    p = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                       preexec_fn=_limited)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return p.stdout


READERS = {
    # name -> (file name to plant, code that reads sys.argv[1] and must raise, naming it)
    "catalog": ("operator.toml", "from pvmit.catalog.loader import load_catalog; load_catalog([P])"),
    "inventory-json": ("inventory.json", "from pvmit.fleet.inventory import read_inventory; read_inventory([P])"),
    "inventory-csv": ("hosts.csv",
                      "from pvmit.fleet.inventory import read_inventory; read_inventory([P, P.parent / 'v.csv'])"),
    "inventory-parquet": ("hosts.parquet",
                          "from pvmit.fleet.inventory import read_inventory; read_inventory([P, P])"),
    "host-facts": ("facts.json", "from pvmit.catalog.loader import load_catalog\n"
                                 "from pvmit.fleet.classes import Resolver\n"
                                 "Resolver(load_catalog()).host_cpu(P.name, P.parent)"),
    "personality": ("cpu.toml", "from pvmit.catalog.loader import load_catalog\n"
                                "from pvmit.vmm.personality import resolve\nresolve(load_catalog(), str(P))"),
    "agent-sysfs": ("spectre_v2", "from pvmit.agent.msrdev import kernel_file; kernel_file(P)"),
    "agent-cpu-list": ("online", "from pvmit.agent.msrdev import online_cpus; online_cpus(P)"),
    "agent-msr-device": ("msr", "from pvmit.agent.msrdev import MsrDevices\n"
                                "MsrDevices(str(P.parent.parent)).read(0, 0x10a)"),
    "host-sysfs": ("itlb_multihit", "from pvmit.host.sysfs import read_vulnerabilities; "
                                    "read_vulnerabilities(P.parent)"),
}
SCRIPT = """
import sys
from pathlib import Path
P = Path(sys.argv[1])
try:
{body}
except Exception as e:
    print(type(e).__name__, e)
else:
    print("read it")
"""


def _plant(tmp_path: Path, name: str, kind: str) -> Path:
    d = tmp_path / "0" if name == "msr" else tmp_path
    d.mkdir(exist_ok=True)
    p = d / name
    if kind == "fifo":
        os.mkfifo(p)
    else:
        p.symlink_to("/dev/zero")
    return p


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
@pytest.mark.parametrize("reader", sorted(READERS))
def test_readers_refuse_fifos_and_devices_without_blocking(tmp_path: Path, reader: str, kind: str) -> None:
    name, body = READERS[reader]
    p = _plant(tmp_path, name, kind)
    out = child(SCRIPT.format(body="\n".join("    " + line for line in body.splitlines())), str(p))
    if reader == "agent-msr-device":  # a character device is what /dev/cpu/N/msr must be (reads are 8 bytes)
        assert out == ("read it\n" if kind == "dev-zero" else
                       f"AgentError {p}: the msr device must be a character device, and this is a FIFO\n"), out
        return
    want = "a FIFO" if kind == "fifo" else "a character device"
    assert want in out and "must be a regular file" in out and str(p) in out, out


def test_cli_refuses_a_fifo_catalog_and_a_dev_zero_inventory(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fifo = tmp_path / "catalog.toml"
    os.mkfifo(fifo)
    r = cli("--catalog", str(fifo), "catalog", "list", timeout=60)
    assert r.code == 2 and "catalog file must be a regular file, and this is a FIFO" in r.stderr, r.stderr
    zero = tmp_path / "inventory.json"
    zero.symlink_to("/dev/zero")
    r = cli("fleet", "plan", str(zero), timeout=60)
    assert r.code == 2 and "inventory must be a regular file, and this is a character device" in r.stderr, r.stderr


def test_size_caps_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "big.json"
    p.write_text(json.dumps({"hosts": [], "vms": []}) + " " * 200)
    with pytest.raises(FileError, match=r"is 224 bytes; pvmit reads at most 100 bytes of it"):
        read_bytes(p, "inventory", 100)
    from pvmit.fleet import inventory

    monkeypatch.setitem(inventory.CAPS, ".json", 100)
    with pytest.raises(InputError, match=r"big.json: inventory is 224 bytes; pvmit reads at most 100 bytes"):
        inventory.read_inventory([p])
    # a file whose size says 0 (/proc) is still read, and still capped
    assert b"Name:" in read_bytes("/proc/self/status", "status", 64 << 10)
    with pytest.raises(FileError, match="is larger than that; pvmit reads at most 10 bytes"):
        read_bytes("/proc/self/status", "status", 10)
    with pytest.raises(FileError, match="must be a regular file, and this is a directory"):
        read_text(tmp_path, "catalog file", 100)
    with pytest.raises(FileError, match="not UTF-8 text: byte 3"):
        (tmp_path / "latin1.toml").write_bytes(b"a =\xe9")
        read_text(tmp_path / "latin1.toml", "catalog file", 100)
    link = tmp_path / "link.json"  # a link to a regular file is fine
    link.symlink_to(p)
    assert read_bytes(link, "inventory", 1000) == p.read_bytes()


def test_json_limits() -> None:
    with pytest.raises(FileError, match="nested more than 64 levels deep"):
        load_json("[" * 100_000 + "]" * 100_000, "deep.json")
    with pytest.raises(FileError, match="nested more than 64 levels deep"):
        load_json('{"a": ' * 65 + "1" + "}" * 65, "deep.json")  # under the parser's limit, over pvmit's
    assert load_json('{"a": ' * 63 + "1" + "}" * 63, "ok.json")
    with pytest.raises(FileError, match="an integer of 5,000 digits"):
        load_json("[" + "7" * 5000 + "]", "int.json")
    for bad in ("NaN", "[Infinity]", "-Infinity", "1e999"):
        with pytest.raises(FileError, match="is not a JSON value|out of range"):
            load_json(bad, "n.json")
    with pytest.raises(FileError, match=r"vms\[1\].name: 'vm-\\ud800' is not valid Unicode text"):
        load_json('{"vms": [{"name": "ok"}, {"name": "vm-\\ud800"}]}', "s.json")
    assert load_json('["\\ud83d\\ude00"]', "pair.json") == ["\U0001f600"]  # a valid pair is one character


def test_toml_limits() -> None:
    with pytest.raises(FileError, match="more than 4300 digits|Exceeds the limit"):
        load_toml("a = " + "1" * 5000, "int.toml")
    with pytest.raises(FileError, match="nested more than 64 levels deep"):
        load_toml(".".join(["a"] * 200) + " = 1", "dotted.toml")  # dotted keys nest without recursion
    with pytest.raises(FileError, match="nested"):
        load_toml("a = " + "[" * 5000, "arrays.toml")


def _inventory(tmp_path: Path, edit: object) -> Path:
    doc = json.loads(SAMPLE.read_text())
    assert callable(edit)
    edit(doc)
    p = tmp_path / "inventory.json"
    p.write_text(json.dumps(doc))
    return p


@pytest.mark.parametrize(("what", "text", "message"), [
    ("deep", '{"hosts": ' + "[" * 5000 + "]" * 5000 + ', "vms": []}', "nested more than 64 levels deep"),
    ("int", '{"hosts": [{"name": "h", "cpu": {"vendor": "intel", "family": ' + "1" * 5000 + "}}], \"vms\": []}",
     "an integer of 5,000 digits"),
    ("surrogate", '{"hosts": [], "vms": [{"name": "vm-\\udc80", "host": "h"}]}',
     r"vms[0].name: 'vm-\udc80' is not valid Unicode text"),
])
def test_fleet_plan_refuses_bad_json_with_a_message(cli, tmp_path: Path, what: str, text: str,  # type: ignore[no-untyped-def]
                                                    message: str) -> None:
    p = tmp_path / f"{what}.json"
    p.write_text(text)
    r = cli("fleet", "plan", str(p))
    assert r.code == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_catalog_check_refuses_a_5000_digit_integer(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "cat.toml"
    p.write_text('[[cpu]]\nid = "x"\nfamily = ' + "6" * 5000 + "\n")
    r = cli("catalog", "check", str(p))
    assert r.code == 2 and "not valid TOML" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "set_int_max_str_digits" not in r.stderr  # Python's advice is not the operator's


def test_escape_sequences_in_names_are_shown_escaped(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    def edit(doc: dict[str, list[dict[str, str]]]) -> None:
        doc["vms"][0]["name"] = HOSTILE_NAME
        doc["hosts"][0]["name"] = HOSTILE_NAME + "-host"
        doc["vms"][1]["host"] = "\x1b[2J" + HOSTILE_NAME  # no such host: an error row that names it
        for v in doc["vms"]:
            if v["host"] == doc["hosts"][0]["name"].removesuffix("-host"):
                v["host"] = HOSTILE_NAME + "-host"

    inv = _inventory(tmp_path, edit)
    r = cli("fleet", "plan", str(inv), "--vm", HOSTILE_NAME)
    shown = r.stdout + r.stderr
    assert r.code == 2, shown  # the row with the unknown host
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in shown
    assert "\\x1b[31mRED\\x1b]0;pwned\\x07\\u202eevil" in r.stdout  # the VM's detail, its name escaped
    assert "no host named '\\x1b[2J\\x1b[31mRED" in r.stderr


def test_numeric_options_have_ranges(cli) -> None:  # type: ignore[no-untyped-def]
    from pvmit.node.process import MAX_HEARTBEAT

    for value in ("0", "-1", str(2 ** 64)):
        r = cli("vmm", "--control", "unix:/nonexistent/x", "--guest-cpu", "icelake-sp", "--heartbeat", value)
        assert r.code == 2 and "Invalid value for '--heartbeat'" in r.stderr, r.stderr
        assert f"1<=x<={MAX_HEARTBEAT}" in r.stderr, r.stderr
    r = cli("oracle", "linux", "--timeout", "nan")
    assert r.code == 2 and "'--timeout'" in r.stderr and "5<=x<=3600" in r.stderr, r.stderr
    r = cli("fleet", "generate", "--vms", "\u0661\u0662", "--hosts", "1", "-o", "/nonexistent/x.json")
    assert r.code == 2 and "'--vms'" in r.stderr and "is not an integer" in r.stderr, r.stderr


def test_bounded_types() -> None:
    b = BoundedInt(1, 10)
    assert b.convert("7", None, None) == 7 and b.convert(" 10 ", None, None) == 10
    for bad in ("0", "11", "\u0667", "1_0", "0x5", "5.0", "", "9" * 5000):
        with pytest.raises(click.BadParameter) as e:
            b.convert(bad, None, None)
        assert len(str(e.value)) < 200
    f = BoundedFloat(5, 3600)
    assert f.convert("120.5", None, None) == 120.5
    for bad in ("nan", "inf", "-inf", "1e999", "4.9", "\u0661\u0662\u0660"):
        with pytest.raises(click.BadParameter):
            f.convert(bad, None, None)


def test_decode_takes_ascii_digits_only(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("decode", "spec_ctrl", "\u0661\u0662")  # Arabic-Indic 12: int() would take it
    assert r.code == 2 and "ASCII digits only" in r.stderr, r.stderr
    r = cli("decode", "spec_ctrl", "9" * 5000)
    assert r.code == 2 and "(5,000 characters)" in r.stderr and len(r.stderr) < 300, r.stderr
    assert parse_register_value("0x10") == 16 and parse_register_value("0b101") == 5
    assert parse_register_value(str(2 ** 64 - 1)) == 2 ** 64 - 1
    for bad in ("1_000", str(2 ** 64), "-1", "0x", "0o7", "\uff11"):
        with pytest.raises(InputError):
            parse_register_value(bad)


def test_long_inputs_are_shortened_in_messages(cli) -> None:  # type: ignore[no-untyped-def]
    long = "x" * 5000
    for args in (("catalog", "show", long), ("vmm", "--control", "unix:/x", "--guest-cpu", "icelake-sp",
                                              "--heartbeat", long), ("oracle", "linux", "--cases", long),
                 ("fleet", "plan", long)):  # the last through the CLI's net for every message (`clean_message`)
        r = cli(*args)
        assert r.code == 2 and "(5,000 characters)" in r.stderr and long not in r.stderr, (args, r.stderr[:300])
        assert max(len(line) for line in r.stderr.splitlines()) < 1000  # the list of oracle cases is the longest


def test_safe_text() -> None:
    assert safe_text("a\x1b[31mb\u202ec\x00\x9b\ud800") == "a\\x1b[31mb\\u202ec\\x00\\x9b\\ud800"
    assert safe_text("line\nnext\tx", lines=True) == "line\nnext\tx"
    assert safe_text("line\nnext") == "line\\x0anext"
    assert safe_text("caf\u00e9 \U0001f600 \u0661") == "caf\u00e9 \U0001f600 \u0661"  # printable text is kept
    assert shorten("y" * 5000) == "y" * 80 + "... (5,000 characters)"
    assert quoted("\x1b") == "'\\x1b'"
    msg = clean_message("bad value " + "9" * 5000 + "\nsecond line \x1b")
    assert msg.startswith("bad value " + "9" * 80 + "... (5,000 characters)\nsecond line \\x1b")


def test_staged_outputs_leave_nothing_on_error(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir"
    with pytest.raises(RuntimeError), staged() as s:
        s.directory(out)
        s.path(out / "a.csv").write_text("a")
        raise RuntimeError("half way")
    assert not (tmp_path / "new").exists()  # the directories it made are gone too
    keep = tmp_path / "report.html"
    keep.write_text("old")
    with pytest.raises(RuntimeError), staged() as s:
        s.path(keep).write_text("new, half")
        raise RuntimeError("half way")
    assert keep.read_text() == "old" and os.listdir(tmp_path) == ["report.html"]
    write_atomic(keep, "new")
    assert keep.read_text() == "new" and os.listdir(tmp_path) == ["report.html"]
    assert oct(keep.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_plan_tables_are_written_all_or_none(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "tables"
    out.mkdir()
    (out / "pools.csv").mkdir()  # the last table cannot be written
    r = cli("fleet", "plan", str(SAMPLE), "-o", str(out), "--format", "csv")
    assert r.code == 2 and "pools.csv" in r.stderr, r.stderr
    assert sorted(os.listdir(out)) == ["pools.csv"]  # no table of the five before it, no temporary file
    r = cli("fleet", "sample", "-o", "/dev/stdout")  # a device is written directly, not replaced
    assert r.code == 0 and json.loads(r.stdout)["hosts"]
