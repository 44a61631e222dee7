"""What the coordinator's Fleet port turned away, as typed records its operator can read.

Flower logs a refused node key as a PEM blob and a plaintext connection not at all (gRPC's TLS layer
drops it below Python). The SuperLink process (server/superlink.py) records each such fault here
instead, naming the institution a key belongs to when the coordinator admitted it once; the console
and the SuperLink's own log show them. One JSON object per line in the state folder's
`fleet-events.jsonl` (owner only), appended, never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path

from cryptography.hazmat.primitives import serialization

FLEET_EVENTS_FILE = "fleet-events.jsonl"
#: The SuperLink process's environment for its gRPC core to log failed handshakes (at INFO, read once at
#: import: Flower sets "error" unless it is set already). Its other INFO lines are dropped (server/superlink.py).
GRPC_LOG_ENV = {"GRPC_VERBOSITY": "INFO"}


class Fault(StrEnum):
    REFUSED_KEY = "refused-key"  # a node key the SuperLink does not (or no longer) admit
    PLAINTEXT = "plaintext"  # a connection that did not speak TLS at all
    TLS_HANDSHAKE = "tls-handshake"  # TLS, but the handshake failed (e.g. the node distrusts our certificate)


@dataclass(frozen=True)
class FleetEvent:
    at: str
    fault: Fault
    institution: str | None = None  # the admitted name of the refused key, if it was ever admitted
    revoked: str | None = None  # when that institution was revoked
    key_sha256: str | None = None

    def sentence(self) -> str:
        if self.fault is Fault.REFUSED_KEY:
            if self.institution is None:
                return f"refused an unknown node key (sha256 {self.key_sha256[:16]}): never admitted"
            if self.revoked:
                return f"refused the node key of {self.institution}: revoked {self.revoked}"
            return (f"refused the node key of {self.institution} (admitted, not revoked: Flower still counts its "
                    "node online, as after a restart within two heartbeats)")
        if self.fault is Fault.PLAINTEXT:
            return "refused a plaintext connection to the Fleet port (TLS is required)"
        return "a connection to the Fleet port failed its TLS handshake (wrong CA or protocol)"


def key_sha256(public_key: bytes) -> str:
    """Fingerprint of a node key in any of the forms it travels in (PEM from Flower, OpenSSH from the registry)."""
    loader = serialization.load_ssh_public_key if public_key.startswith(b"ecdsa-") else serialization.load_pem_public_key
    der = loader(public_key).public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def refused_key(public_key: bytes, registry: dict) -> FleetEvent:
    """The event for a refused key, named after the admitted institution that held it, if any.

    `registry`: the coordinator's institutions.json (name -> {"public_key": OpenSSH line, "revoked": ...})."""
    try:
        fingerprint = key_sha256(public_key)
    except ValueError:
        return FleetEvent(now(), Fault.REFUSED_KEY, key_sha256=hashlib.sha256(public_key).hexdigest())
    for name, entry in registry.items():
        try:
            if key_sha256(str(entry.get("public_key", "")).encode()) == fingerprint:
                return FleetEvent(now(), Fault.REFUSED_KEY, name, entry.get("revoked"), fingerprint)
        except ValueError:
            continue
    return FleetEvent(now(), Fault.REFUSED_KEY, key_sha256=fingerprint)


# gRPC core's reason for a failed server-side handshake when the peer sent no TLS record at all.
_NOT_TLS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG")


def handshake_fault(grpc_log_line: str) -> Fault | None:
    """The fault a gRPC core log line reports, if it is a failed TLS handshake (gRPC logs it at INFO)."""
    if "Handshake failed" not in grpc_log_line:
        return None
    return Fault.PLAINTEXT if any(reason in grpc_log_line for reason in _NOT_TLS) else Fault.TLS_HANDSHAKE


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def record(path: Path, event: FleetEvent) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(asdict(event)) + "\n")


def read(path: Path, last: int = 50) -> list[FleetEvent]:
    """The newest `last` events, oldest first; none if the file does not exist yet."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()[-last:]
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            data = json.loads(line)
            events.append(FleetEvent(**dict(data, fault=Fault(data["fault"]))))
        except (ValueError, TypeError, KeyError):
            continue  # a line cut short by a crash
    return events
