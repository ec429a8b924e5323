"""What every command shares: the options the root group sets (State) and the --json flag.

Kept apart from `app`, which imports every command, so that commands never import `app` back.
"""

from __future__ import annotations

from pathlib import Path

import click

from pvmit.catalog.loader import Catalog, load_catalog

json_option = click.option("--json", "json_out", is_flag=True, help="Write one JSON document on stdout.")


class State:
    """Options every command shares, set by the root group."""

    def __init__(self, catalogs: list[Path]) -> None:
        self.catalogs = catalogs
        self._catalog: Catalog | None = None

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = load_catalog(self.catalogs)
        return self._catalog


pass_state = click.make_pass_decorator(State)
