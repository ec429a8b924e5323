"""Shared fixtures: the built-in catalog, a CLI runner that uses the real entry point, environment probes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import Phase, settings

from pvmit.catalog.loader import Catalog, load_catalog

# tools/mutation.py runs the tests once per mutant: there a failing example is enough, shrinking it only costs time,
# and a fixed seed makes the score repeatable. Property tests made with `settings(...)` inherit this profile.
settings.register_profile("mutation", phases=(Phase.explicit, Phase.reuse, Phase.generate), database=None,
                          derandomize=True)
if os.environ.get("PVMIT_HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["PVMIT_HYPOTHESIS_PROFILE"])

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_vmm_outlives_its_test() -> Iterator[None]:
    """A test that fails before stopping its VMM processes must not leave them counting (and eating the CPU the
    next tests need)."""
    yield
    from pvmit.node.cluster import kill_leftovers
    kill_leftovers()


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog()


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str, timeout: float = 120) -> Result:
    """Run `python -m pvmit ARGS` in a subprocess: the same entry point users get."""
    p = subprocess.run([sys.executable, "-m", "pvmit", *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "COLUMNS": "200"})
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture
def cli():
    return run_cli
