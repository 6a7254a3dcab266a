"""Durable per-document results, so an interrupted evaluation resumes where it stopped.

A checkpoint is a JSON-lines file next to the results file: line 1 is a header holding the run's
fingerprint (model, dataset, windows, dtype, lmloss version, ...); every later line is one finished
document's sums, flushed and fsynced before the next document starts. A process killed mid-write
leaves at most one torn last line, which a resume drops. Floats round-trip exactly through JSON
(Python writes the shortest repr that reads back to the same float64), so resumed totals are
bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["Checkpoint", "checkpoint_path"]

_KIND = "lmloss-checkpoint-v1"


def checkpoint_path(output: str | os.PathLike, rank: int = 0) -> Path:
    """Where the checkpoint of `output` lives: results.json -> results.json.partial[.rankN].jsonl"""
    out = Path(output)
    suffix = ".partial.jsonl" if rank == 0 else f".partial.rank{rank}.jsonl"
    return out.with_name(out.name + suffix)


def _read_lines(path: Path) -> tuple[dict | None, list[dict], int]:
    """(header, rows, byte length of the complete lines); a torn last line is left out."""
    raw = path.read_bytes()
    header, rows, good = None, [], 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # torn by a kill mid-write
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            break
        if header is None:
            header = obj
        else:
            rows.append(obj)
        good += len(line)
    return header, rows, good


def _diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: checkpoint has {a.get(k)!r}, this run has {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


class Checkpoint:
    """Append-only record of finished documents for one run configuration."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict, *, resume: bool):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalized as it will read back
        self.rows: dict[int, dict] = {}
        if resume and self.path.exists():
            header, rows, good = _read_lines(self.path)
            if header is None or header.get("kind") != _KIND:
                raise ValueError(f"{self.path} is not an lmloss checkpoint; delete it or run without --resume")
            diffs = _diff(header["fingerprint"], self.fingerprint)
            if diffs:
                raise ValueError(
                    f"cannot resume from {self.path}: it belongs to another configuration\n  "
                    + "\n  ".join(diffs)
                    + "\nRerun with the same settings, or without --resume to start over."
                )
            with open(self.path, "r+b") as f:  # drop a torn last line before appending
                f.truncate(good)
            self.rows = {int(r["index"]): r for r in rows}
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")
            self._write({"kind": _KIND, "fingerprint": self.fingerprint})

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(obj) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, row: dict) -> None:
        """Record one finished document (a dict with an integer "index"), durably."""
        self.rows[int(row["index"])] = row
        self._write(row)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def remove(self) -> None:
        """Delete the checkpoint once the final results are safely written."""
        self.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
