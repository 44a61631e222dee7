"""The institution's node key: how the coordinator recognises this institution.

Flower authenticates a SuperNode by an ECDSA signature on every request, checked against the
public key the coordinator admitted. Both halves are OpenSSH-format EC keys on NIST P-384 (what
Flower 1.39 expects). The private key never leaves this machine: it is written owner-only and
only its path is ever passed on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

PRIVATE_KEY = "node.key"
PUBLIC_KEY = "node.pub"


class NodeKeyError(ValueError):
    """A node key that cannot be created or used; the message names the file."""


@dataclass(frozen=True)
class NodeKeys:
    private: Path
    public: Path

    @property
    def public_line(self) -> str:
        return self.public.read_text(encoding="utf-8").strip()


def generate(folder: Path, comment: str = "") -> NodeKeys:
    """Create node.key (0600) and node.pub in `folder`; never overwrites an existing key."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = NodeKeys(folder / PRIVATE_KEY, folder / PUBLIC_KEY)
    for path in (keys.private, keys.public):
        if path.exists():
            raise NodeKeyError(f"{path}: already exists; move it away to make a new key")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    fd = os.open(keys.private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    line = public.decode("ascii") + (f" {comment}" if comment else "")
    keys.public.write_text(line + "\n", encoding="utf-8")
    return keys


def check_private_key(path: Path) -> None:
    """Fail early, with the file's name, on a missing, unreadable, non-EC or group-readable key."""
    path = Path(path)
    if not path.is_file():
        raise NodeKeyError(f"{path}: no such key file (create one with `fedtune-client keygen`)")
    if path.stat().st_mode & 0o077:
        raise NodeKeyError(f"{path}: readable by other users; run `chmod 600 {path}`")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise NodeKeyError(f"{path}: not an unencrypted OpenSSH private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise NodeKeyError(f"{path}: not an EC key (Flower node authentication needs a NIST-curve EC key)")
