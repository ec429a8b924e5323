"""The error types pvmit raises for bad input and unusable environments; the CLI turns them into messages."""

from __future__ import annotations


class PvmitError(Exception):
    """Base of every error pvmit reports to a user. The message names what was wrong."""

    exit_code = 1


class InputError(PvmitError):
    """A file, argument or value given to pvmit is malformed or names something that does not exist."""

    exit_code = 2


class CatalogError(InputError):
    """A CPU catalog file is malformed; the message names the file, the entry and the field."""


class UnknownModelError(InputError):
    """A CPU model name matches no catalog entry."""
