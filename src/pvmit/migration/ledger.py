"""What a VMM knows of each migration it took part in: the record that settles a commit lost in flight.

The source decides, once, whether a migration commits (`decide`); the destination only ever runs a guest on that
decision, or when the source's VMM is provably gone. Both keep their side here, so that after a lost connection
each can ask the other's VMM (the control command `outcome`) and hear the same answer. Thread-safe; bounded (the
most recent migrations only).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

KEEP = 256
SOURCE_STATES = ("deciding", "committed", "aborted")
DEST_STATES = ("receiving", "prepared", "committed", "aborted")


@dataclass
class Entry:
    role: str  # "source" or "destination"
    state: str
    how: str = ""


class Ledger:
    def __init__(self) -> None:
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def _put(self, migration: str, entry: Entry) -> None:
        self._entries[migration] = entry
        self._entries.move_to_end(migration)
        while len(self._entries) > KEEP:
            self._entries.popitem(last=False)
        self.changed.notify_all()

    # --- the source's side -------------------------------------------------------------------------------------
    def start(self, migration: str) -> None:
        with self._lock:
            self._put(migration, Entry("source", "deciding"))

    def decide(self, migration: str, state: str, how: str) -> None:
        """The source's decision: committed (CMIT is about to go out) or aborted (the guest resumes here)."""
        assert state in ("committed", "aborted")
        with self._lock:
            self._put(migration, Entry("source", state, how))

    # --- the destination's side --------------------------------------------------------------------------------
    def prepared(self, migration: str) -> None:
        with self._lock:
            self._put(migration, Entry("destination", "prepared"))

    def _settle(self, migration: str, state: str, how: str) -> bool:
        with self._lock:
            e = self._entries.get(migration)
            if e is None or e.role != "destination":
                return False
            if e.state == "prepared":
                e.state, e.how = state, how
                self.changed.notify_all()
            return e.state == state

    def commit(self, migration: str, how: str) -> bool:
        """Settle a prepared migration as committed; False if it was already settled the other way."""
        return self._settle(migration, "committed", how)

    def abort(self, migration: str, how: str) -> bool:
        return self._settle(migration, "aborted", how)

    # --- both --------------------------------------------------------------------------------------------------
    def phase(self, migration: str) -> str:
        with self._lock:
            e = self._entries.get(migration)
            return e.state if e else "unknown"

    def how(self, migration: str) -> str:
        with self._lock:
            e = self._entries.get(migration)
            return e.how if e else ""

    def role(self, migration: str) -> str:
        with self._lock:
            e = self._entries.get(migration)
            return e.role if e else ""

    def in_doubt(self) -> list[str]:
        """Migrations this destination holds prepared, waiting to hear how the source decided."""
        with self._lock:
            return [m for m, e in self._entries.items() if e.role == "destination" and e.state == "prepared"]

    def answer(self, migration: str, told: str | None) -> dict[str, str]:
        """The `outcome` control command: what this VMM knows of `migration`. A source telling its decision
        (`told`) settles a destination's prepared copy."""
        if told in ("committed", "aborted") and self.role(migration) == "destination":
            self._settle(migration, told, f"the source's VMM said {told}")
        with self._lock:
            e = self._entries.get(migration)
            return {"role": e.role, "state": e.state} if e else {"role": "none", "state": "unknown"}


__all__ = ["DEST_STATES", "Entry", "Ledger", "SOURCE_STATES"]
