"""The consortium CA, the coordinator's certificate and the institutions' node keys."""

import ipaddress
import stat
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.supernode.register import try_load_public_key

from client.cli import main as client_main
from client.keys import NodeKeyError, check_private_key
from server import pki
from server.cli import main as server_main


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def san(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return names.get_values_for_type(x509.DNSName), [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]


@pytest.fixture
def ca_dir(tmp_path):
    assert server_main(["ca", "init", "--dir", str(tmp_path / "ca")]) == 0
    return tmp_path / "ca"


def test_ca_is_a_p384_ca_with_owner_only_key(ca_dir):
    cert = load_cert(ca_dir / "ca.pem")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject == cert.issuer
    assert isinstance(cert.public_key().curve, ec.SECP384R1)
    assert cert.not_valid_after_utc - datetime.now(timezone.utc) > timedelta(days=3600)
    assert mode(ca_dir / "ca.key") == 0o600
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    assert key.public_key() == cert.public_key()


def test_server_certificate_defaults_to_localhost_and_loopback(ca_dir, capsys):
    assert server_main(["cert", "issue", "--dir", str(ca_dir)]) == 0
    cert = load_cert(ca_dir / "server.pem")
    assert san(cert) == (["localhost"], ["127.0.0.1"])
    cert.verify_directly_issued_by(load_cert(ca_dir / "ca.pem"))
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert mode(ca_dir / "server.key") == 0o600
    assert "localhost, 127.0.0.1" in capsys.readouterr().out
    pki.check_server_files(ca_dir / "ca.pem", ca_dir / "server.pem", ca_dir / "server.key")


def test_server_certificate_names_every_host_and_ip_with_chosen_validity(ca_dir, tmp_path):
    out = tmp_path / "issued"
    code = server_main(["cert", "issue", "--dir", str(ca_dir), "--out", str(out), "--host", "coord.example.org",
                        "--host", "localhost", "--ip", "10.1.2.3", "--ip", "::1", "--days", "30"])
    assert code == 0
    cert = load_cert(out / "server.pem")
    dns, ips = san(cert)
    assert dns == ["coord.example.org", "localhost"]
    assert [ipaddress.ip_address(ip) for ip in ips] == [ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("::1")]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=29) < lifetime <= timedelta(days=30)
    assert not (ca_dir / "server.pem").exists()
    assert (out / "ca.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()
    assert not (out / "ca.key").exists()


def test_existing_keys_are_never_overwritten(ca_dir, capsys):
    before = (ca_dir / "ca.key").read_bytes()
    assert server_main(["ca", "init", "--dir", str(ca_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err
    assert (ca_dir / "ca.key").read_bytes() == before


def test_bad_ip_is_a_one_line_error(ca_dir, capsys):
    assert server_main(["cert", "issue", "--dir", str(ca_dir), "--ip", "not-an-ip"]) == 2
    assert "--ip" in capsys.readouterr().err


def test_expired_foreign_or_mismatched_server_files_are_refused(ca_dir, tmp_path):
    expired = pki.issue_server_cert(ca_dir, tmp_path / "expired", ["localhost"], [], days=1,
                                    not_before=datetime.now(timezone.utc) - timedelta(days=3))
    with pytest.raises(pki.PkiError, match="expired on"):
        pki.check_server_files(ca_dir / "ca.pem", expired.cert, expired.key)
    other_ca = pki.init_ca(tmp_path / "other")
    good = pki.issue_server_cert(ca_dir, tmp_path / "good", ["localhost"], ["127.0.0.1"])
    with pytest.raises(pki.PkiError, match="not signed by the CA"):
        pki.check_server_files(other_ca.cert, good.cert, good.key)
    with pytest.raises(pki.PkiError, match="does not belong"):
        pki.check_server_files(ca_dir / "ca.pem", good.cert, expired.key)


def test_keygen_writes_openssh_keys_flower_accepts_and_never_prints_the_private_key(tmp_path, capsys):
    assert client_main(["keygen", "--out", str(tmp_path / "node"), "--comment", "st-mary"]) == 0
    out = capsys.readouterr().out
    private, public = tmp_path / "node" / "node.key", tmp_path / "node" / "node.pub"
    assert mode(private) == 0o600
    line = public.read_text().strip()
    assert line.startswith("ecdsa-sha2-nistp384 AAAA") and line.endswith(" st-mary")
    assert line in out
    assert "PRIVATE KEY" not in out
    for secret_line in private.read_text().splitlines()[1:-1]:
        assert secret_line not in out
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)  # OpenSSH format only
    assert isinstance(key.curve, ec.SECP384R1)
    assert serialization.load_ssh_public_key(line.encode()) == key.public_key()
    try_load_public_key(public)  # Flower's own check at `flwr supernode register`
    check_private_key(private)


def test_keygen_refuses_to_overwrite_and_loose_key_modes_are_refused(tmp_path, capsys):
    assert client_main(["keygen", "--out", str(tmp_path)]) == 0
    assert client_main(["keygen", "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "node.key").chmod(0o644)
    with pytest.raises(NodeKeyError, match="chmod 600"):
        check_private_key(tmp_path / "node.key")
