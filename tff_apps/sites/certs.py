"""Certificates for mutual TLS between the coordinator and the sites' gateways.

`make_test_pki` writes a throwaway federation: a test CA, one server certificate per site
and the coordinator's client certificate. It is for trials and tests only: a production
federation brings its own PKI (docs/sites.md) and hands each party the same three files,
`ca.pem` + its own `<name>.pem` / `<name>.key`. Everything cryptographic comes from the
`cryptography` package and grpcio's TLS; nothing here is home-made.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import UserError

COORDINATOR = "coordinator"
CA = "ca"
# A site's name becomes a DNS name in its certificate and a file name beside the CA's.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_BACKDATE = datetime.timedelta(minutes=5)  # tolerates clocks a little behind ours


@dataclass(frozen=True)
class Credentials:
    """One party's TLS material as PEM bytes: the CA it trusts, its certificate and key."""

    ca: bytes
    cert: bytes
    key: bytes

    def server(self) -> grpc.ServerCredentials:
        """A gateway's credentials: it only accepts callers holding a certificate the CA signed."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel(self) -> grpc.ChannelCredentials:
        """The coordinator's credentials: it checks the gateway against the CA and shows its own."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def check_site_names(names: list[str]) -> list[str]:
    """The names, checked: usable as file and DNS names, none reserved, none twice."""
    if not names:
        raise UserError("site certs --sites: expected at least one site name, e.g. --sites hospital_a,hospital_b")
    for name in names:
        if not _NAME.fullmatch(name):
            raise UserError(f"site certs --sites: {name!r} is not a site name (letters, digits, '_' or '-')")
        if name in (CA, COORDINATOR):
            raise UserError(f"site certs --sites: {name!r} is reserved; choose another site name")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"site certs --sites: {duplicates[0]!r} is listed twice")
    return names


def make_test_pki(out_dir: Path | str, site_names: list[str], days: int = 30) -> Path:
    """Writes a test CA, one server certificate per site and the coordinator's client one.

    Files: ``ca.pem``/``ca.key``, ``<site>.pem``/``<site>.key`` (SANs DNS:<site>,
    DNS:localhost, IP:127.0.0.1) and ``coordinator.pem``/``coordinator.key``; keys 0600.
    The folder appears whole or not at all, and an existing CA is never overwritten
    (every certificate it signed would stop working). Returns the folder.
    """
    out = Path(out_dir)
    check_site_names(list(site_names))
    if not 0 < days <= 3650:
        raise UserError(f"site certs --days {days}: expected a number of days in 1..3650")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"site certs --out {out}: the folder exists and is not empty; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # 0700
    try:
        _write_pki(staging, site_names, days)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write_pki(folder: Path, site_names: list[str], days: int) -> None:
    now = datetime.datetime.now(datetime.timezone.utc) - _BACKDATE
    until = now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, now, until)
    _write(folder, CA, ca_cert, ca_key)
    for name in site_names:
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.DNSName(name), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        cert = _leaf(name, key, ca_cert, ca_key, now, until, ExtendedKeyUsageOID.SERVER_AUTH, sans)
        _write(folder, name, cert, key)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(COORDINATOR, key, ca_cert, ca_key, now, until, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    _write(folder, COORDINATOR, cert, key)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tff-apps test federation"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _ca_certificate(key: ec.EllipticCurvePrivateKey, now, until) -> x509.Certificate:
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name("tff-apps test CA"))
        .issuer_name(_name("tff-apps test CA"))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf(name, key, ca_cert, ca_key, now, until, usage, sans) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        # One purpose each: a site's server certificate cannot act as the coordinator.
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Created 0600, never readable by others even for an instant.
    fd = os.open(folder / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def load_credentials(ca: Path | str, cert: Path | str, key: Path | str, what: str = "--certs") -> Credentials:
    """Reads and checks one party's PEM files: a bad one is a one-line UserError naming it.

    Checked before any connection: each file parses, the key belongs to the certificate,
    the CA signed the certificate, and the certificate is valid today.
    """
    ca_pem, cert_pem, key_pem = (_read(Path(p), what) for p in (ca, cert, key))
    ca_cert, leaf = _parse_cert(ca_pem, ca, what), _parse_cert(cert_pem, cert, what)
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise UserError(f"{what}: {key} is not an unencrypted PEM private key ({err})") from None
    if private.public_key().public_numbers() != leaf.public_key().public_numbers():
        raise UserError(f"{what}: {key} is not the key of {cert}; give the pair issued together")
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as err:  # InvalidSignature has no message
        raise UserError(f"{what}: {cert} was not signed by the CA in {ca} ({type(err).__name__})") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    for path, parsed in ((ca, ca_cert), (cert, leaf)):
        if not parsed.not_valid_before_utc <= now <= parsed.not_valid_after_utc:
            raise UserError(
                f"{what}: {path} is valid from {parsed.not_valid_before_utc:%Y-%m-%d} to "
                f"{parsed.not_valid_after_utc:%Y-%m-%d}, not today; issue a new one"
            )
    return Credentials(ca=ca_pem, cert=cert_pem, key=key_pem)


def credentials_from_dir(certs_dir: Path | str, name: str, what: str = "--certs") -> Credentials:
    """``ca.pem`` + ``<name>.pem`` + ``<name>.key`` from one folder (as make_test_pki writes them)."""
    folder = Path(certs_dir)
    return load_credentials(folder / f"{CA}.pem", folder / f"{name}.pem", folder / f"{name}.key", what)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what}: {path} does not exist (test certificates: `tff-apps site certs`)") from None
    except OSError as err:
        raise UserError(f"{what}: cannot read {path} ({err.strerror})") from None


def _parse_cert(pem: bytes, path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise UserError(f"{what}: {path} is not a PEM certificate") from None


def common_name(cert_pem: bytes) -> str:
    """The certificate's subject common name (a site's or the coordinator's name)."""
    names = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""
