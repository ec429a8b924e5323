"""A short chaos soak in the test suite (`pvmit bench soak --minutes N` runs it for longer, with figures): several
VMM processes, counting guests, random migrations back and forth and every fault the soak knows, then the counts
of every guest read across every log."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvmit.bench.soak import run
from pvmit.kvm.system import kvm_available

USABLE, WHY = kvm_available()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not USABLE, reason=f"needs a usable /dev/kvm: {WHY}")]


def test_chaos_soak_loses_nothing(tmp_path: Path) -> None:
    report = run(tmp_path, 60, guests=2, seed=20261127)
    doc = report.to_json()
    print(doc)
    assert report.ok, doc["problems"]
    assert doc["guests_lost"] == doc["guests_running_twice"] == doc["count_gaps"] == doc["count_repeats"] == 0
    assert doc["promise_violations"] == doc["tracebacks"] == 0
    assert doc["migrations_committed"] >= 3 and doc["counts_checked"] > 100
    kinds = {k for k in doc["injected"] if " " not in k}
    assert len(kinds) >= 6, doc["injected"]  # a minute is enough for most kinds of fault
