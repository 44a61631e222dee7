"""The consortium's certificate authority and the coordinator's TLS certificate.

Institutions trust the coordinator through one CA certificate (`ca.pem`) handed to them out of
band; the coordinator's server certificate is signed by that CA and names the host names and
IP addresses institutions dial. Private keys are written owner-only (0600) and never overwritten.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_KEY = "ca.key"
CA_CERT = "ca.pem"
SERVER_KEY = "server.key"
SERVER_CERT = "server.pem"
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class PkiError(ValueError):
    """A certificate operation that cannot go ahead; the message says which file and why."""


@dataclass(frozen=True)
class Issued:
    key: Path
    cert: Path


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey, private_format: serialization.PrivateFormat) -> None:
    """Create `path` owner-only from the first byte on: the key is never readable by others."""
    data = key.private_bytes(serialization.Encoding.PEM, private_format, serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PkiError(f"{path}: already exists; move it away to make a new one") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _refuse_existing(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            raise PkiError(f"{path}: already exists; move it away to make a new one")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune consortium"),
         x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def init_ca(folder: Path, common_name: str = "fedtune consortium CA", days: int = 3650) -> Issued:
    """A self-signed EC P-384 CA that may sign server certificates only (path length 0)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = folder / CA_KEY, folder / CA_CERT
    _refuse_existing(key_path, cert_path)
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.now(timezone.utc)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    write_private_key(key_path, key, serialization.PrivateFormat.PKCS8)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(key_path, cert_path)


def _load_ca(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = Path(folder) / CA_KEY, Path(folder) / CA_CERT
    for path in (key_path, cert_path):
        if not path.is_file():
            raise PkiError(f"{path}: no such file (run `fedtune-server ca init --dir {folder}` first)")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path}: not an EC private key")
    return key, x509.load_pem_x509_certificate(cert_path.read_bytes())


def issue_server_cert(
    ca_folder: Path,
    out_folder: Path,
    hosts: list[str],
    ips: list[str],
    days: int = 365,
    not_before: datetime | None = None,
) -> Issued:
    """A TLS server certificate for the coordinator, signed by the CA, valid for `hosts` and `ips`.

    `out_folder` also gets a copy of ca.pem, so it holds everything the coordinator serves with
    while the CA key can stay elsewhere. `not_before` back-dates the start of validity (tolerates clock skew between parties);
    the certificate ends `days` after it.
    """
    if not hosts and not ips:
        raise PkiError("name at least one --host or --ip the institutions will dial")
    try:
        addresses = [ipaddress.ip_address(ip) for ip in ips]
    except ValueError as exc:
        raise PkiError(f"--ip: {exc}") from None
    ca_key, ca_cert = _load_ca(ca_folder)
    out_folder = Path(out_folder)
    out_folder.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out_folder / SERVER_KEY, out_folder / SERVER_CERT
    _refuse_existing(key_path, cert_path)
    key = ec.generate_private_key(ec.SECP384R1())
    start = not_before or datetime.now(timezone.utc) - timedelta(minutes=5)
    san = [x509.DNSName(host) for host in hosts] + [x509.IPAddress(address) for address in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else ips[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    write_private_key(key_path, key, serialization.PrivateFormat.PKCS8)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if not (out_folder / CA_CERT).exists():
        (out_folder / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return Issued(key_path, cert_path)


def check_server_files(ca_path: Path, cert_path: Path, key_path: Path) -> datetime:
    """Refuse files no institution could accept; return when the certificate expires.

    Flower would start with an expired certificate, a certificate from another CA or a key that
    does not match, and every institution's handshake would then fail with a vaguer message.
    """
    for path in (ca_path, cert_path, key_path):
        if not Path(path).is_file():
            raise PkiError(f"{path}: no such file")
    ca = x509.load_pem_x509_certificate(Path(ca_path).read_bytes())
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    now = datetime.now(timezone.utc)
    if cert.not_valid_after_utc <= now:
        raise PkiError(f"{cert_path}: expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; issue a new one")
    if cert.not_valid_before_utc > now:
        raise PkiError(f"{cert_path}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(f"{cert_path}: not signed by the CA in {ca_path}") from None
    if key.public_key().public_bytes(*_SPKI) != cert.public_key().public_bytes(*_SPKI):
        raise PkiError(f"{key_path}: does not belong to the certificate {cert_path}")
    return cert.not_valid_after_utc


def subject_alt_names(cert_path: Path) -> list[str]:
    """The host names and IP addresses a certificate is valid for, for messages and checks."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName) + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
