"""The coordinator's checkpoints: what it needs to continue a job after a crash, one file per round.

After every completed round the ServerApp writes `checkpoints/round-NNNNN.ckpt` in the run folder:
the global trainable weights, the strategy's own state (FedAdam's moments and current weights,
the institution-level DP round count), the round number, the round log, the central evaluations,
the job config and the job id. A file is written to a temporary name, fsynced, renamed over its
final name with `os.replace` and the folder fsynced, so a crash leaves the previous checkpoint or
the new one. Each file carries the SHA-256 of its contents: a file torn by a failing disk or a
copy is detected and never loaded, and `latest` falls back to the previous one, which is why the
newest `KEEP` are kept.

Format: MAGIC, the 32-byte SHA-256 of the rest, then a NumPy .npz (no pickles) holding the arrays
and one uint8 array `meta` with the JSON of everything else.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from server.round_log import RoundLog
from server.run_folder import CHECKPOINT_DIR, IN_FLIGHT_FILE, JOB_FILE

MAGIC = b"FEDTCKP1"
KEEP = 2
FORMAT = 1
_NAME = re.compile(r"^round-(\d{5})\.ckpt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, or a run folder whose checkpoints are all unreadable."""


@dataclass
class Checkpoint:
    job_id: str
    server_round: int  # the last completed round; 0: none yet
    job_json: str
    weights: list[np.ndarray]
    strategy: dict  # server.strategy.state_dict: {"arrays": {name: [ndarray]}, "values": {name: number}}
    round_log: dict  # round_log_to_dict
    evaluations: dict[int, dict]
    wall_seconds: float = 0.0
    sessions: list[dict] = field(default_factory=list)  # one per ServerApp that ran the job: started, from round
    voided_rounds: list[int] = field(default_factory=list)  # rounds released but not aggregated (server/app.py)


def round_log_to_dict(log: RoundLog) -> dict:
    return asdict(log)


def round_log_from_dict(data: dict) -> RoundLog:
    """JSON turns integer keys (rounds, node ids) into strings; this turns them back."""
    by_round = {key: {int(rnd): value for rnd, value in data.get(key, {}).items()}
                for key in ("replies", "declined", "dropped", "rejected")}
    node_bytes = {int(rnd): {int(node): list(sent) for node, sent in nodes.items()}
                  for rnd, nodes in data.get("node_bytes", {}).items()}
    return RoundLog(**by_round, node_bytes=node_bytes,
                    node_names={int(node): name for node, name in data.get("node_names", {}).items()})


def encode(checkpoint: Checkpoint) -> bytes:
    arrays = {f"weights/{i}": a for i, a in enumerate(checkpoint.weights)}
    for name, values in checkpoint.strategy.get("arrays", {}).items():
        arrays.update({f"strategy/{name}/{i}": a for i, a in enumerate(values)})
    meta = {
        "format": FORMAT, "job_id": checkpoint.job_id, "round": checkpoint.server_round, "job": checkpoint.job_json,
        "weights": len(checkpoint.weights),
        "strategy_arrays": {name: len(values) for name, values in checkpoint.strategy.get("arrays", {}).items()},
        "strategy_values": checkpoint.strategy.get("values", {}),
        "round_log": checkpoint.round_log, "evaluations": {str(k): v for k, v in checkpoint.evaluations.items()},
        "wall_seconds": checkpoint.wall_seconds, "sessions": checkpoint.sessions,
        "voided_rounds": checkpoint.voided_rounds,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    payload = buffer.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def decode(data: bytes) -> Checkpoint:
    """The checkpoint in `data`; CheckpointError if it is torn, altered or not a checkpoint."""
    head = len(MAGIC) + 32
    if len(data) < head or not data.startswith(MAGIC):
        raise CheckpointError("not a fedtune checkpoint (or truncated)")
    payload = data[head:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC):head]:
        raise CheckpointError("checksum mismatch: the file is torn or altered")
    with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
        meta = json.loads(arrays["meta"].tobytes())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint format {meta.get('format')}, expected {FORMAT}")
        strategy = {
            "arrays": {name: [arrays[f"strategy/{name}/{i}"] for i in range(count)]
                       for name, count in meta["strategy_arrays"].items()},
            "values": meta["strategy_values"],
        }
        weights = [arrays[f"weights/{i}"] for i in range(meta["weights"])]
    return Checkpoint(
        job_id=meta["job_id"], server_round=int(meta["round"]), job_json=meta["job"], weights=weights,
        strategy=strategy, round_log=meta["round_log"],
        evaluations={int(k): v for k, v in meta["evaluations"].items()},
        wall_seconds=float(meta["wall_seconds"]), sessions=list(meta["sessions"]),
        voided_rounds=list(meta["voided_rounds"]),
    )


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_folder: Path, checkpoint: Checkpoint) -> Path:
    """Write the round's checkpoint atomically and durably; keep the newest `KEEP`."""
    folder = Path(run_folder) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{checkpoint.server_round:05d}.ckpt"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(encode(checkpoint))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(folder)
    for old in sorted(_rounds(folder), reverse=True)[KEEP:]:
        (folder / f"round-{old:05d}.ckpt").unlink(missing_ok=True)
    return path


def _rounds(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return [int(match.group(1)) for entry in folder.iterdir() if (match := _NAME.match(entry.name))]


def latest(run_folder: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; None if the folder has none. A torn newest file is skipped
    (the previous one is used); CheckpointError if there are checkpoints and none verifies."""
    folder = Path(run_folder) / CHECKPOINT_DIR
    rounds = sorted(_rounds(folder), reverse=True)
    for rnd in rounds:
        try:
            return decode((folder / f"round-{rnd:05d}.ckpt").read_bytes())
        except CheckpointError:
            continue
    if rounds:
        raise CheckpointError(f"{folder}: no checkpoint verifies (rounds {', '.join(map(str, rounds))})")
    return None


def claim_run_folder(run_folder: Path, job_id: str, job_json: str, session: dict) -> list[dict]:
    """Mark the run folder as `job_id`'s (job.json: id, config, sessions) and record this ServerApp's
    session; every session so far. A folder of another job is refused: its record would be overwritten."""
    path = Path(run_folder) / JOB_FILE
    owner = read_owner(run_folder)
    if owner is not None and owner.get("job_id") != job_id:
        raise CheckpointError(f"{run_folder}: belongs to job {owner.get('job_id')}, not {job_id}")
    sessions = [*(owner or {}).get("sessions", []), session]
    tmp = path.with_name(path.name + ".tmp")
    owner = {"job_id": job_id, "job": json.loads(job_json), "sessions": sessions}
    tmp.write_text(json.dumps(owner, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return sessions


def read_owner(run_folder: Path) -> dict | None:
    """job.json: the folder's job id and sessions, or None for a folder no job has claimed."""
    path = Path(run_folder) / JOB_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_in_flight(run_folder: Path, server_round: int, institutions: list[str]) -> None:
    """Before a round's exchange is sent: the round and who is asked, so that a resumed job can name the
    institutions a crash left having been asked (and perhaps having released) for a round never aggregated."""
    path = Path(run_folder) / IN_FLIGHT_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"round": server_round, "asked": sorted(set(institutions))}) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def asked_in_flight(run_folder: Path, server_round: int) -> list[str]:
    """Who the crashed session had asked for `server_round` (none recorded: [])."""
    path = Path(run_folder) / IN_FLIGHT_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return list(record.get("asked", [])) if record.get("round") == server_round else []
