#!/usr/bin/env python3
"""Coverage-guided fuzzing of pvmit's parsers with atheris (libFuzzer), over the same targets the test suite runs
under hypothesis (src/pvmit/safety/fuzz_targets.py).

    .venv/bin/pip install atheris
    .venv/bin/python tools/fuzz.py stream -max_total_time=60
    .venv/bin/python tools/fuzz.py catalog_file -runs=100000

A crash writes the input to ./crash-*; copy it into tests/fixtures/crashers/<target>/ so the tests replay it.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from pvmit.safety.fuzz_targets import TARGETS, run


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: fuzz.py TARGET [libFuzzer options]; targets: {', '.join(sorted(TARGETS))}")
    name = sys.argv.pop(1)
    atheris.Setup(sys.argv, lambda data: run(name, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
