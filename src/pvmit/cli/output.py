"""Shared output helpers: one JSON document on stdout for --json, rich text otherwise, messages on stderr."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pvmit.safetext import clean_message, safe_text

# Pipes get a fixed, generous width instead of rich's 80 columns, so tables do not wrap in logs.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 132)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 132)


__all__ = ["derived_table", "emit_json", "err", "esc", "out", "warn", "yes_no"]


def esc(text: str) -> str:
    """Text from data, safe to print with rich: controls and invisible formatting characters escaped (newlines
    too: a name must not start a line of its own), and never read as rich markup."""
    return escape(safe_text(text))


def emit_json(doc: Any) -> None:
    """Write one JSON document (sorted keys are not used: key order is part of the documented shape)."""
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def warn(message: str) -> None:
    err.print("[yellow]pvmit: warning:[/] " + escape(clean_message(message)))


def yes_no(flag: bool | None) -> str:
    return {True: "[green]yes[/]", False: "[red]no[/]", None: "[yellow]unknown[/]"}[flag]


def derived_table(summary: dict[str, Any], title: str, where: str = "") -> Table:
    """The (a)-(c) answers of `pvmit.derive.cpu_summary` as a table; callers may add rows."""
    t = Table(title=title)
    for col in ("question", "answer", "reason"):
        t.add_column(col)
    for key, question in (("retpoline_effective", "retpoline effective"),
                          ("bhb_short_effective", "short BHB sequence effective")):
        t.add_row(question + where, yes_no(summary[key]["answer"]), esc(summary[key]["reason"]))
    for name, f in summary["controls"].items():
        t.add_row(f"{name} available{where}", yes_no(f["answer"]), esc(f["reason"]))
    return t
