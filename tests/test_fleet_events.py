"""The coordinator's record of what its Fleet port turned away (server/fleet_events.py), without a network."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.fleet_events import FLEET_EVENTS_FILE, Fault, FleetEvent, handshake_fault, read, record, refused_key


def node_key() -> tuple[bytes, str]:
    """A node key as Flower sends it (PEM) and as the coordinator's registry keeps it (OpenSSH)."""
    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    ssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return pem, ssh


def test_a_refused_key_is_named_after_the_institution_it_was_admitted_as():
    (mary_pem, mary_ssh), (john_pem, john_ssh), (stranger_pem, _) = node_key(), node_key(), node_key()
    registry = {"st-mary": {"public_key": mary_ssh, "revoked": "2026-12-01 10:00:00Z"},
                "st-john": {"public_key": john_ssh, "revoked": None}}
    mary, john, stranger = (refused_key(pem, registry) for pem in (mary_pem, john_pem, stranger_pem))
    assert (mary.institution, mary.revoked) == ("st-mary", "2026-12-01 10:00:00Z")
    assert mary.sentence() == "refused the node key of st-mary: revoked 2026-12-01 10:00:00Z"
    assert john.institution == "st-john" and "not revoked" in john.sentence()
    assert stranger.institution is None and "unknown node key" in stranger.sentence()
    assert "BEGIN PUBLIC KEY" not in stranger.sentence()
    assert len({mary.key_sha256, john.key_sha256, stranger.key_sha256}) == 3


def test_a_key_that_is_not_a_key_is_still_recorded_without_its_bytes():
    event = refused_key(b"-----BEGIN PUBLIC KEY-----\nnot base64\n", {})
    assert event.fault is Fault.REFUSED_KEY and event.institution is None and len(event.key_sha256) == 64


def test_grpc_handshake_lines_tell_plaintext_from_other_tls_failures():
    prefix = "I1202 00:21:21.757220   11087 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: "
    assert handshake_fault(prefix + "error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER") is Fault.PLAINTEXT
    assert handshake_fault(prefix + "error:10000412:SSL routines:OPENSSL_internal:SSLV3_ALERT_BAD_CERTIFICATE") \
        is Fault.TLS_HANDSHAKE
    assert handshake_fault("I1202 00:21:21.757220   11087 chttp2_server.cc:100] Accepted connection") is None


def test_events_file_is_owner_only_and_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / FLEET_EVENTS_FILE
    record(path, FleetEvent("2026-12-02 00:00:00 UTC", Fault.PLAINTEXT))
    record(path, FleetEvent("2026-12-02 00:00:01 UTC", Fault.REFUSED_KEY, key_sha256="ab" * 32))
    with path.open("a") as handle:
        handle.write('{"at": "2026-12-02 00:00:02 UTC", "fau')  # the SuperLink was killed mid-write
    assert path.stat().st_mode & 0o777 == 0o600
    assert [e.fault for e in read(path)] == [Fault.PLAINTEXT, Fault.REFUSED_KEY]
    assert [e.fault for e in read(path, last=2)] == [Fault.REFUSED_KEY]
    assert read(tmp_path / "none-yet.jsonl") == []
