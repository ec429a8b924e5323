"""Mutual TLS for every TCP endpoint (control and migration), with credentials laid out as QEMU's tls-creds-x509.

A credentials directory holds ca-cert.pem (the CA both ends trust), server-cert.pem and server-key.pem (what a
listening VMM presents), client-cert.pem and client-key.pem (what a connecting VMM or `pvmit ctl`/`migrate`
presents): the files and names of QEMU's `-object tls-creds-x509,dir=...` (docs/system/tls.rst in QEMU), so one
directory can serve both. A listener demands a client certificate signed by the CA; a client checks the server's
certificate against the CA and against the host name or IP address it connected to. TLS 1.2 is the minimum.

`make_test_ca` writes such a directory for given host names, for tests and first trials (`pvmit tls make-test-ca`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvmit.errors import InputError
from pvmit.net.text import shorten

CA, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY = (
    "ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")
FILES = (CA, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)
MAX_PEM = 1 << 20
HOW = ("give --tls-creds DIR: a directory with ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem and "
       "client-key.pem, as QEMU's tls-creds-x509 (`pvmit tls make-test-ca DIR HOST...` makes a test set)")


@dataclass
class Credentials:
    """A tls-creds-x509 directory. Contexts are built on first use per role and kept."""

    directory: Path
    _server: ssl.SSLContext | None = field(default=None, repr=False)
    _client: ssl.SSLContext | None = field(default=None, repr=False)

    @classmethod
    def load(cls, directory: str | Path, *, roles: tuple[str, ...] = ("server", "client")) -> Credentials:
        """Check the directory now (so that a VMM says what is wrong at start, not at its first connection)."""
        d = Path(directory)
        if not d.is_dir():
            raise InputError(f"TLS credentials {shorten(str(d))}: not a directory; {HOW}")
        creds = cls(d)
        for role in roles:
            creds.server_context() if role == "server" else creds.client_context()
        return creds

    def _file(self, name: str) -> str:
        path = self.directory / name
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise InputError(f"TLS credentials {shorten(str(self.directory))}: {name} is missing; {HOW}") from None
        except OSError as e:
            raise InputError(f"TLS credentials {shorten(str(path))}: {e.strerror or e}") from None
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"TLS credentials {shorten(str(path))}: not a regular file")
        if st.st_size > MAX_PEM:
            raise InputError(f"TLS credentials {shorten(str(path))}: larger than {MAX_PEM} bytes")
        return str(path)

    def _load(self, ctx: ssl.SSLContext, cert: str, key: str) -> ssl.SSLContext:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(self._file(CA))
            ctx.load_cert_chain(self._file(cert), self._file(key))
        except ssl.SSLError as e:
            raise InputError(f"TLS credentials {shorten(str(self.directory))}: {cert}/{key}/{CA} do not load: "
                             f"{e.reason or e}") from None
        return ctx

    def server_context(self) -> ssl.SSLContext:
        if self._server is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: a client without a certificate from our CA gets nothing
            self._server = self._load(ctx, SERVER_CERT, SERVER_KEY)
        return self._server

    def client_context(self) -> ssl.SSLContext:
        if self._client is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the server's certificate and host name
            self._client = self._load(ctx, CLIENT_CERT, CLIENT_KEY)
        return self._client


def describe_certificate(sock: ssl.SSLSocket) -> str:
    """The peer certificate's subject common name, for logs."""
    cert: dict[str, Any] = dict(sock.getpeercert() or {})
    for rdn in cert.get("subject", ()):
        for pair in rdn:
            if pair[0] == "commonName":
                return f"certificate CN={shorten(str(pair[1]), 80)}"
    return "certificate without a common name"


def make_test_ca(directory: str | Path, hosts: list[str], *, days: int = 365, not_before_days: int = 0,
                 client_name: str = "pvmit client", ca_name: str = "pvmit test CA",
                 expired: tuple[str, ...] = ()) -> list[Path]:
    """Write a CA and server and client certificates (EC P-256) into `directory` in the tls-creds-x509 layout.

    The server certificate names `hosts` (DNS names or IP addresses) as subject alternative names. The keys are
    written 0600. `days` may be negative (and `not_before_days` too) to make an expired set for tests; `expired`
    ("server", "client") makes just those certificates expired, under a valid CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise InputError("name at least one host (a DNS name or an IP address) for the server certificate")
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not h or not h.isascii() or not all(c.isalnum() or c in ".-" for c in h) or len(h) > 253:
                raise InputError(f"{shorten(h)!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(h))
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create {shorten(str(d))}: {e.strerror or e}") from None
    now = datetime.datetime.now(datetime.UTC)
    start = now + datetime.timedelta(days=not_before_days) - datetime.timedelta(minutes=5)
    end = now + datetime.timedelta(days=days)
    if end <= start:
        start = end - datetime.timedelta(days=1)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name(ca_name)).issuer_name(name(ca_name))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start - datetime.timedelta(days=3)).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False, key_agreement=False,
                                            key_cert_sign=True, crl_sign=True, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName] | None, role: str
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        until = now - datetime.timedelta(days=1) if role in expired else end
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(min(start, until - datetime.timedelta(days=1))).not_valid_after(until)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, names, "server")
    client, client_key = leaf(client_name, ExtendedKeyUsageOID.CLIENT_AUTH, None, "client")
    pem = serialization.Encoding.PEM

    def key_bytes(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    written = []
    contents = ((CA, ca_cert.public_bytes(pem), 0o644),
                (SERVER_CERT, server.public_bytes(pem), 0o644), (SERVER_KEY, key_bytes(server_key), 0o600),
                (CLIENT_CERT, client.public_bytes(pem), 0o644), (CLIENT_KEY, key_bytes(client_key), 0o600))
    for fname, data, mode in contents:
        path = d / fname
        tmp = d / f".{fname}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise InputError(f"cannot write {shorten(str(path))}: {e.strerror or e}") from None
        written.append(path)
    return written


__all__ = ["FILES", "HOW", "Credentials", "describe_certificate", "make_test_ca"]
