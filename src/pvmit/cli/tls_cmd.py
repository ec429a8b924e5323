"""`pvmit tls`: credentials for the TCP endpoints (mutual TLS), in QEMU's tls-creds-x509 layout."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path
from typing import Any

import click

from pvmit.cli.output import emit_json, esc, out
from pvmit.cli.params import BoundedInt
from pvmit.cli.state import json_option
from pvmit.errors import InputError
from pvmit.net.text import shorten
from pvmit.net.tls import CA, CLIENT_CERT, FILES, SERVER_CERT, Credentials, make_test_ca


@click.group("tls")
def tls() -> None:
    """Mutual-TLS credentials for `pvmit vmm`, `migrate` and `ctl` over TCP."""


@tls.command("make-test-ca")
@click.argument("directory", type=click.Path(path_type=Path))
@click.argument("hosts", nargs=-1, required=True)
@click.option("--days", default=365, show_default=True, type=BoundedInt(1, 3650),
              help="Validity of the CA and certificates.")
@click.option("--force", is_flag=True, help="Overwrite credentials already in DIRECTORY.")
def make_test_ca_cmd(directory: Path, hosts: tuple[str, ...], days: int, force: bool) -> int:
    """Write a test CA and a server and a client certificate (EC P-256) into DIRECTORY, as QEMU's tls-creds-x509
    expects them (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem). The server
    certificate names every HOST (DNS name or IP address) that clients will connect to. For tests and first trials:
    in production use your own CA."""
    existing = [f for f in FILES if (directory / f).exists()]
    if existing and not force:
        raise InputError(f"{shorten(str(directory))} already holds {', '.join(existing)}; add --force to replace them")
    for path in make_test_ca(directory, list(hosts), days=days):
        out.print(esc(str(path)))
    return 0


@tls.command("check")
@click.argument("directory", type=click.Path(path_type=Path))
@json_option
def check_cmd(directory: Path, json_out: bool) -> int:
    """Load the credentials in DIRECTORY as a VMM would and show each certificate's subject, names and validity.
    Exit 1 when a certificate has expired or is not yet valid."""
    Credentials.load(directory)  # raises InputError naming the file that does not load
    from cryptography import x509

    now = datetime.datetime.now(datetime.UTC)
    rows: list[dict[str, Any]] = []
    ok = True
    for name in (CA, SERVER_CERT, CLIENT_CERT):
        cert = x509.load_pem_x509_certificate((directory / name).read_bytes())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(n.value) for n in san]
        except x509.ExtensionNotFound:
            names = []
        valid = cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
        ok &= valid
        rows.append({"file": name, "subject": cert.subject.rfc4514_string(), "names": names,
                     "not_before": cert.not_valid_before_utc.isoformat(),
                     "not_after": cert.not_valid_after_utc.isoformat(), "valid_now": valid})
    if json_out:
        emit_json({"schema": "pvmit.tls-check/1", "directory": str(directory), "openssl": ssl.OPENSSL_VERSION,
                   "certificates": rows})
    else:
        for r in rows:
            state = "valid" if r["valid_now"] else "[red]NOT VALID NOW[/]"
            out.print(f"{esc(str(r['file']))}: {esc(str(r['subject']))}, names {esc(', '.join(r['names']) or '-')}, "
                      f"{esc(str(r['not_before']))} .. {esc(str(r['not_after']))}: {state}")
    return 0 if ok else 1
