"""What every pipeline shares (DESIGN.md contracts): provenance, atomic writes, resume by finished ids, error files.

A record (one input id) is finished when its manifest `<out>/<id>/_SUCCESS.json` exists; the manifest is written
last, atomically, and carries the provenance: input id and path, stage versions and the hash of the config. A rerun
skips finished ids with the same config hash and refuses to mix outputs of a different config into the same
directory. Problems (a failed record, or a skipped part of one) are returned by the tasks as rows, written to
`<out>/errors.jsonl` by the driver, and counted in the summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raytrain.config import RaytrainError

MANIFEST = "_SUCCESS.json"


def config_hash(config: Any) -> str:
    """A short stable hash of a JSON-able config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON so that readers see the old file or the whole new one, never a part."""
    _atomic(Path(path), lambda f: f.write(json.dumps(obj, indent=1).encode()))


def write_bytes(path: Path, data: bytes) -> None:
    """Write bytes so that readers see the old file or the whole new one, never a part."""
    _atomic(Path(path), lambda f: f.write(data))


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    _atomic(Path(path), lambda f: np.savez(f, **arrays))


@dataclass
class Provenance:
    input_id: str
    input_path: str
    stage_versions: dict[str, str]
    config_hash: str


def finish(out: Path, prov: Provenance, counts: dict[str, Any]) -> None:
    """Mark `prov.input_id` finished (its outputs must already be written)."""
    write_json(Path(out) / prov.input_id / MANIFEST, {**prov.__dict__, "counts": counts})


def is_finished(out: Path, input_id: str, cfg_hash: str) -> bool:
    """True if `input_id` was finished with this config; an error if it was finished with another."""
    path = Path(out) / input_id / MANIFEST
    if not path.exists():
        return False
    done = json.loads(path.read_text())
    if done.get("config_hash") != cfg_hash:
        raise RaytrainError(f"out={out}: {input_id} was labelled with another config (hash {done.get('config_hash')}, "
                            f"now {cfg_hash}); use a new out= directory, or delete it to redo it")
    return True


@dataclass
class RecordResult:
    """What a task returns for one input id."""
    id: str
    status: str  # done | failed
    reason: str = ""
    counts: dict[str, Any] = field(default_factory=dict)
    problems: list[dict[str, Any]] = field(default_factory=list)  # skipped parts: {"where", "reason"}

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "reason": self.reason, "counts": json.dumps(self.counts),
                "problems": json.dumps(self.problems)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "RecordResult":
        return cls(str(row["id"]), str(row["status"]), str(row["reason"]), json.loads(row["counts"]),
                   json.loads(row["problems"]))


def summarize(out: Path, results: Iterable[RecordResult], skipped: list[str]) -> dict[str, Any]:
    """Write `<out>/errors.jsonl` (this run's failures and problems, one JSON object a line); return the counts."""
    results = list(results)
    lines = [{"id": r.id, "error": r.reason} for r in results if r.status == "failed"]
    lines += [{"id": r.id, **p} for r in results for p in r.problems]
    _atomic(Path(out) / "errors.jsonl", lambda f: f.write("".join(json.dumps(x) + "\n" for x in lines).encode()))
    problem_kinds = Counter(p["reason"].split(":")[0] for r in results for p in r.problems)
    return {"done": sum(r.status == "done" for r in results), "failed": sum(r.status == "failed" for r in results),
            "skipped_finished": len(skipped), "problems": dict(problem_kinds), "errors_file": str(Path(out) / "errors.jsonl")}
