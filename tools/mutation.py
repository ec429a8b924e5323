#!/usr/bin/env python3
"""Mutation testing of pvmit's core rules with mutmut, one module at a time, each against its own fast tests.

    .venv/bin/pip install -e '.[test,mutation]'
    .venv/bin/python tools/mutation.py derive               # one module
    .venv/bin/python tools/mutation.py interface plan derive  # several, one after another
    .venv/bin/python tools/mutation.py migration --jobs 1    # the migration sides (slower: needs /dev/kvm)
    .venv/bin/python tools/mutation.py --list               # modules and the tests each runs
    .venv/bin/python tools/mutation.py --report derive      # the last run's score and survivors again
    .venv/bin/python tools/mutation.py --survivors derive   # after adding tests: rerun the survivors only (the
                                                            # rest of src/ is brought up to date first)
    .venv/bin/python tools/mutation.py --survivors migration --only 'pvmit.migration.source.*'
                                                            # ... only those whose names match

For each module it copies src/, tests/, docs/ and pyproject.toml into .mutation/MODULE/ (mutmut 3 runs the tests from
a copy of the tree it mutates, under mutants/), adds the module's [tool.mutmut] section, runs `mutmut run` with
--jobs children (default 2: this is a 2-core machine shared with others), and prints killed / total. Every mutant
that lived is then shown with its diff, unless tools/mutation-equivalents.toml lists it as equivalent, with the
reason. A timeout counts as killed (the mutant made a test hang). Exit 0 when every module reaches --target
(default 90 %) of its non-equivalent mutants killed and no survivor is unexplained, 1 otherwise, 2 on bad usage.

docs/testing.md has the method and the scores recorded per module. Later: `cd .mutation/MODULE && mutmut show NAME`
shows one mutant, `mutmut browse` all of them.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EQUIVALENTS = REPO / "tools" / "mutation-equivalents.toml"


@dataclass(frozen=True)
class Module:
    """What to mutate (mutmut `only_mutate` globs, relative to the repository) and the tests that judge it."""

    mutate: tuple[str, ...]
    tests: tuple[str, ...]
    note: str = ""


# Tests that start `python -m pvmit` in a subprocess (named *cli*) cannot see a mutant (mutmut switches mutants on
# inside its own process), so they are left out; so are the whole-catalog `pvmit verify` run (minutes) and tests
# that need QEMU.
MODULES: dict[str, Module] = {
    "derive": Module(("src/pvmit/derive.py",),
                     ("tests/test_derive.py", "tests/test_reference_rules.py", "tests/test_interface_policy.py")),
    "interface": Module(("src/pvmit/interface/*",),
                        ("tests/test_interface_policy.py", "tests/test_interface_properties.py",
                         "tests/test_interface_conformance.py", "tests/test_interface_state.py",
                         "tests/test_interface_core.py", "tests/test_spec_ctrl.py", "tests/test_hostile_guest.py",
                         "tests/test_derive.py", "tests/test_bhi.py", "tests/test_bhi_properties.py",
                         "tests/test_bhi_interface.py", "tests/test_bhi_compare.py", "tests/test_pooldesc.py")),
    "plan": Module(("src/pvmit/fleet/plan.py",),
                   ("tests/test_fleet_plan.py", "tests/test_fleet_plan_details.py")),
    "migration": Module(("src/pvmit/migration/*",),
                        ("tests/test_migration_stream.py", "tests/test_stream_validation.py",
                         "tests/test_migration_inprocess.py", "tests/test_migration_settle.py",
                         "tests/test_outgoing.py", "tests/test_receiver.py", "tests/test_stream_fields.py"),
                        "needs /dev/kvm: both sides run in the test process on real KVM VMs (the VMM-process tests "
                        "of tests/test_migration.py cannot see a mutant)"),
}
DESELECT = "not cli and not whole_catalog"

_RESULT = re.compile(r"^\s+(\S+): (.+)$")
_KILLED = {"killed", "timeout", "caught by type check", "segfault"}


def equivalents() -> dict[str, list[dict[str, str]]]:
    """tools/mutation-equivalents.toml: per module, mutants known to be equivalent, matched by the function they
    are in and the line the mutant puts there (mutmut's numbers change whenever the code does; these do not)."""
    if not EQUIVALENTS.exists():
        return {}
    doc = tomllib.loads(EQUIVALENTS.read_text())
    return {k: list(v) for k, v in doc.items()}


def prepare(name: str, module: Module, workdir: Path) -> None:
    """A fresh copy of the tree with this module's mutmut configuration."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    shutil.copytree(REPO / "src", workdir / "src", ignore=ignore)
    shutil.copytree(REPO / "tests", workdir / "tests", ignore=ignore)
    shutil.copytree(REPO / "docs", workdir / "docs")  # a few tests read what the docs say (docs/bhi.md)
    write_config(name, module, workdir)


def write_config(name: str, module: Module, workdir: Path) -> None:
    """pyproject.toml with the module's [tool.mutmut] section, in the copy and in mutmut's own tree."""
    tests = [t for t in module.tests if (REPO / t).exists()]

    def toml_list(xs: list[str] | tuple[str, ...]) -> str:
        return "[" + ", ".join(f'"{x}"' for x in xs) + "]"

    (workdir / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text() + f"""

[tool.mutmut]  # written by tools/mutation.py for the module {name!r}
source_paths = ["src/"]
only_mutate = {toml_list(module.mutate)}
pytest_add_cli_args_test_selection = {toml_list([*tests, "-k", DESELECT])}
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-m", "not qemu"]
also_copy = ["docs/"]
use_git_change_detection = false
""")
    if (workdir / "mutants").is_dir():
        shutil.copy2(workdir / "pyproject.toml", workdir / "mutants" / "pyproject.toml")


def refresh_unmutated(module: Module, workdir: Path) -> None:
    """Bring every source file the module does not mutate up to date in the copy and in mutmut's tree (the
    mutated files must be unchanged; mutmut's tree holds them rewritten with their mutants, and its records of
    them beside: those are left alone)."""
    mutated = {p.relative_to(REPO) for pattern in module.mutate for p in REPO.glob(pattern) if p.is_file()}
    current = {p.relative_to(REPO) for p in (REPO / "src").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    for tree in (workdir, workdir / "mutants"):
        old = {p.relative_to(tree) for p in (tree / "src").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
        for rel in old - current:
            if not any(str(rel).startswith(str(m)) for m in mutated):  # mutmut keeps core.py.meta, core.py.spans
                (tree / rel).unlink()
        for rel in current - mutated:
            dest = tree / rel
            if not dest.exists() or dest.read_bytes() != (REPO / rel).read_bytes():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, dest)


def results(workdir: Path) -> dict[str, str]:
    """mutmut's status of every mutant of the last run in `workdir`."""
    res = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=workdir,
                         capture_output=True, text=True)
    statuses: dict[str, str] = {}
    for line in res.stdout.splitlines():
        m = _RESULT.match(line)
        if m:
            statuses[m.group(1)] = m.group(2)
    return statuses


def diff_of(workdir: Path, mutant: str) -> tuple[str, str]:
    """(function, the lines the mutant changes as '-old / +new') for one mutant."""
    p = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=workdir, capture_output=True,
                       text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    # mutmut names a function x_NAME and a method xǁCLASSǁNAME
    raw = mutant.split(".")[-1].split("__mutmut_")[0]
    function = raw[2:].replace("ǁ", ".") if raw.startswith("xǁ") else raw.removeprefix("x_")
    return function, "\n".join(lines)


def run_module(name: str, module: Module, args: argparse.Namespace, known: list[dict[str, str]]) -> bool:
    workdir = args.workdir / name
    print(f"== {name}: mutating {', '.join(module.mutate)}; tests: {' '.join(module.tests)}", flush=True)
    if module.note:
        print(f"   note: {module.note}", flush=True)
    started = time.monotonic()
    log = workdir / "mutmut-run.log"
    returncode = 0
    if not args.report and not args.survivors:
        prepare(name, module, workdir)
        env = {**os.environ, "PVMIT_HYPOTHESIS_PROFILE": "mutation"}  # tests/conftest.py: no shrinking, fixed seed
        with log.open("w") as out:
            returncode = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs)],
                                        cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    elif not workdir.exists():
        print(f"   no earlier run in {workdir}", file=sys.stderr)
        return False
    if args.survivors:  # the same mutants again, against the tests as they are now (the code must be unchanged)
        for pattern in module.mutate:
            for path in (p for p in REPO.glob(pattern) if p.is_file()):
                copy = workdir / path.relative_to(REPO)
                if not copy.is_file() or path.read_bytes() != copy.read_bytes():
                    print(f"   {path.relative_to(REPO)} changed since the last run: run the module afresh",
                          file=sys.stderr)
                    return False
        lived = [k for k, s in results(workdir).items() if s not in _KILLED
                 and (not args.only or any(fnmatch.fnmatchcase(k, pat) for pat in args.only))]
        if not lived:
            print("   no survivor of the last run matches; nothing to rerun", flush=True)
            return True
        write_config(name, module, workdir)  # the module's tests may have grown
        refresh_unmutated(module, workdir)  # what the module uses (catalog, derive, ...) may have changed
        (workdir / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)  # which tests cover what: ask again
        for tree in (workdir, workdir / "mutants"):
            for sub in ("tests", "docs"):
                shutil.rmtree(tree / sub, ignore_errors=True)
                shutil.copytree(REPO / sub, tree / sub,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis"))
        env = {**os.environ, "PVMIT_HYPOTHESIS_PROFILE": "mutation"}
        with log.open("a") as out:
            returncode = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs),
                                         *lived], cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                        env=env).returncode
    elapsed = time.monotonic() - started
    statuses = results(workdir)
    if returncode or not statuses:
        print(f"   mutmut failed (exit {returncode}); its output is in {log}", file=sys.stderr)
        return False
    killed = sum(1 for s in statuses.values() if s in _KILLED)
    total = len(statuses)
    lived = sorted(k for k, s in statuses.items() if s not in _KILLED)
    equivalent: list[tuple[str, str, str]] = []
    unexplained: list[tuple[str, str, str, str]] = []
    for mutant in lived:
        function, diff = diff_of(workdir, mutant)
        added = "\n".join(ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+"))
        why = next((e["why"] for e in known if e["function"] == function and e["mutant"].strip() == added), None)
        if why is None:
            unexplained.append((mutant, statuses[mutant], function, diff))
        else:
            equivalent.append((mutant, function, why))
    scored = total - len(equivalent)
    score = killed / scored if scored else 1.0
    ok = score >= args.target and not unexplained
    print(f"   {name}: killed {killed} / {total} mutants; {len(equivalent)} equivalent (listed); "
          f"{len(unexplained)} unexplained; score {killed}/{scored} = {score:.1%} "
          f"(target {args.target:.0%}): {'PASS' if ok else 'FAIL'}"
          + ("" if args.report else f"; {elapsed:.0f} s with {args.jobs} children"
                                    + (" (survivors only)" if args.survivors else "")),
          flush=True)
    if args.verbose:
        for mutant, function, why in equivalent:
            print(f"   equivalent {mutant} ({function}): {why}")
    for mutant, status, function, diff in unexplained:
        if args.only and not any(fnmatch.fnmatchcase(mutant, pat) for pat in args.only):
            continue  # counted above; shown only when asked for
        print(f"\n   {status}: {mutant} (in {function})")
        for ln in diff.splitlines():
            print(f"      {ln}")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("modules", nargs="*", help=f"modules to mutate: {', '.join(MODULES)} (default: "
                                               "derive, interface, plan)")
    ap.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    ap.add_argument("--target", type=float, default=0.90, help="share of mutants to kill (default 0.90)")
    ap.add_argument("--workdir", type=Path, default=REPO / ".mutation", help="where the copies go")
    ap.add_argument("--list", action="store_true", help="show the modules and their tests, run nothing")
    ap.add_argument("-v", "--verbose", action="store_true", help="also list the equivalent mutants")
    ap.add_argument("--report", action="store_true", help="report on the last run in --workdir, run nothing")
    ap.add_argument("--survivors", action="store_true",
                    help="rerun only the last run's survivors against the current tests (the code must not have "
                         "changed)")
    ap.add_argument("--equivalents", action="store_true",
                    help="print tools/mutation-equivalents.toml as the Markdown list in docs/testing.md, run nothing")
    ap.add_argument("--only", action="append", metavar="PATTERN",
                    help="with --survivors: rerun only the survivors whose names match this shell pattern "
                         "(repeatable), e.g. 'pvmit.migration.source.*'")
    args = ap.parse_args(argv)
    if args.only and not args.survivors:
        print("mutation.py: --only goes with --survivors", file=sys.stderr)
        return 2
    names = args.modules or ["derive", "interface", "plan"]
    bad = [n for n in names if n not in MODULES]
    if bad or args.jobs < 1 or not 0 < args.target <= 1:
        print(f"mutation.py: unknown module {', '.join(bad)} (known: {', '.join(MODULES)})" if bad
              else "mutation.py: --jobs must be at least 1 and --target in (0, 1]", file=sys.stderr)
        return 2
    if args.equivalents:  # the list docs/testing.md carries, from the one file that holds it
        for n, entries in equivalents().items():
            print(f"\n{n} ({len(entries)}):\n")
            for e in entries:
                mutant = e["mutant"].replace("\n", " / ")
                print(f"- `{e['function']}`: `{mutant}`: {e['why']}")
        return 0
    if args.list:
        for n, m in MODULES.items():
            print(f"{n}: mutates {' '.join(m.mutate)}; runs {' '.join(m.tests)} -k {DESELECT!r}")
        return 0
    try:
        import mutmut  # noqa: F401
    except ImportError:
        print("mutation.py: mutmut is not installed: pip install -e '.[mutation]'", file=sys.stderr)
        return 2
    known = equivalents()
    results = [run_module(n, MODULES[n], args, known.get(n, [])) for n in names]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
