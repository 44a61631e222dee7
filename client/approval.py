"""The institution's list of approved app bundles: which code may run next to its data.

With every job the coordinator ships an app bundle (a Flower FAB, a zip of fedtune's code), and
the node would run whatever arrives. The institution operator approves a bundle by its SHA-256,
the hash Flower itself files bundles under (`fedtune-server bundle` prints it before a job is
submitted, `flwr ls` after); the node's gate (client/gate.py) starts code only for a listed hash.
The list is a JSON file in the node's state folder, replaced atomically, so the gate never reads
half a list, and read again for every task, so an approval or revocation counts from the next
message on without a restart.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from common.messages import Reason, Refusal

APPROVALS_FILE = "approved-bundles.json"
BUNDLE_HASH = re.compile(r"[0-9a-f]{64}")

Approvals = dict[str, dict[str, str]]  # bundle hash -> {"approved": UTC time, "note": text}


class ApprovalError(ValueError):
    """A bad hash or an unreadable approval list; one line for the institution operator."""


def approvals_file(state_dir: Path) -> Path:
    return Path(state_dir) / APPROVALS_FILE


def parse_hash(text: str) -> str:
    """The bundle hash in canonical form (64 lowercase hex digits); `sha256:` prefix allowed."""
    value = text.strip().lower().removeprefix("sha256:")
    if not BUNDLE_HASH.fullmatch(value):
        raise ApprovalError(f"{text!r}: not a bundle hash (64 hex digits, as `fedtune-server bundle` prints it)")
    return value


def with_approval(approvals: Approvals, bundle: str, note: str, when: str) -> Approvals:
    return {**approvals, bundle: {"approved": when, "note": note}}


def without_approval(approvals: Approvals, bundle: str) -> Approvals:
    if bundle not in approvals:
        raise ApprovalError(f"bundle {bundle} is not approved on this node (see `fedtune-client approvals`)")
    return {key: value for key, value in approvals.items() if key != bundle}


def refusal(institution: str, bundle: str) -> str:
    """The reason sent to the coordinator (a `Refusal` record); it names the hash to get approved."""
    return Refusal(institution, Reason.BUNDLE_NOT_APPROVED, bundle).encode()


def load(path: Path) -> Approvals:
    """The approval list; none approved when the file does not exist yet."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApprovalError(f"{path}: unreadable approval list ({exc}); fix it or approve again") from None
    if not isinstance(data, dict) or not all(BUNDLE_HASH.fullmatch(key) and isinstance(value, dict)
                                             for key, value in data.items()):
        raise ApprovalError(f"{path}: not an approval list (expected {{bundle hash: {{...}}}})")
    return data


def save(path: Path, approvals: Approvals) -> None:
    """Write the whole list to a temporary file beside it, then rename it over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(approvals, indent=2, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)  # the operator's alone, like the rest of the state folder
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
