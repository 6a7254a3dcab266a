"""Durable per-document results, so an interrupted evaluation resumes where it stopped.

A checkpoint is a JSON-lines file next to the results file. Line 1 is a header holding the run's
fingerprint (model, tokenizer, windows, dtype, lmloss version, and the corpus's content hash and
document count); every later line is one finished document's sums, flushed and fsynced before the
next document starts. Every line carries a checksum of its own content:

    line = json.dumps({**obj, "checksum": sha256(canonical json of obj)[:16]})

so an edited, bit-flipped or spliced line is found. A process killed mid-write leaves at most one
torn last line (no newline), which a resume drops; any other unreadable line is corruption, and
reading stops with an error instead of silently dropping the rows after it. Each row names its
document by index and by the hash of its text, and its byte, word and character counts must match
the document it claims (`check_rows`), so a checkpoint of a changed corpus is refused.

Floats round-trip exactly through JSON (Python writes the shortest repr that reads back to the
same float64), so restored rows are bit-identical to the rows written.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["Checkpoint", "fingerprint", "restore", "checkpoint_path", "rank_path", "checkpoint_files", "read_checkpoint", "count_rows",
           "check_rows", "text_sha256", "corpus_sha256"]

_KIND = "lmloss-checkpoint-v2"
_COUNTS = ("n_tokens", "n_bytes", "n_words", "n_chars")


def text_sha256(text: str) -> str:
    """The first 16 hex digits of sha256(text.encode("utf-8")): a document's identity in a checkpoint."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def corpus_sha256(documents: Sequence) -> str:
    """sha256 over the documents' text hashes, in order: changes when any text, or the order or
    number of documents, changes."""
    h = hashlib.sha256()
    for d in documents:
        h.update(text_sha256(d.text).encode() + b"\n")
    return h.hexdigest()


def _checksum(obj: dict) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def checkpoint_path(output: str | os.PathLike, rank: int = 0) -> Path:
    """Where the CLI keeps the checkpoint of `output`: results.json -> results.json.partial.jsonl
    (rank r > 0: results.json.partial.rank{r}.jsonl)."""
    out = Path(output)
    return rank_path(out.with_name(out.name + ".partial.jsonl"), rank)


def rank_path(base: str | os.PathLike, rank: int) -> Path:
    """The file rank `rank` writes for checkpoint `base`: base itself for rank 0, else base's
    sibling with ".rank{rank}" before its suffix (run.jsonl -> run.rank2.jsonl)."""
    base = Path(base)
    return base if rank == 0 else base.with_name(f"{base.stem}.rank{rank}{base.suffix}")


def checkpoint_files(base: str | os.PathLike) -> list[Path]:
    """Every rank's file of checkpoint `base` that exists (a resumed run may use another world size)."""
    base = Path(base)
    pattern = glob.escape(str(base.with_name(base.stem))) + ".rank*" + glob.escape(base.suffix)
    ranks = sorted(Path(p) for p in glob.glob(pattern) if Path(p).stem.rsplit(".rank", 1)[-1].isdigit())
    return ([base] if base.is_file() else []) + ranks


def _lines(path: Path) -> tuple[list[bytes], int]:
    """(complete lines, byte length of them); a torn last line (no newline) is left out."""
    raw = path.read_bytes()
    lines = raw.splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        lines.pop()  # torn by a kill mid-write
    return lines, sum(len(line) for line in lines)


def count_rows(path: str | os.PathLike) -> int:
    """Complete lines after the header, without checking them: how much a fresh start would discard."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines, _ = _lines(path)
    return max(0, len(lines) - 1)


def _corrupt(path: Path, line_no: int, why: str, n_lines: int) -> ValueError:
    return ValueError(
        f"checkpoint {path} is corrupt at line {line_no} of {n_lines} ({why}). lmloss wrote every line "
        "with a checksum, so the file was changed or damaged after it was written; resuming would "
        "drop or trust rows it cannot vouch for. Restore the file, or delete it to start the run over "
        "(scripts/eval.py: --overwrite); its rows are then discarded.")


def _check_row_fields(row: dict) -> str:
    """'' if row has the fields and types of a document row, else what is wrong."""
    if not isinstance(row.get("index"), int) or isinstance(row.get("index"), bool) or row["index"] < 0:
        return f"index {row.get('index')!r} is not a non-negative integer"
    nll = row.get("nll_nats")
    if not isinstance(nll, (int, float)) or isinstance(nll, bool) or not math.isfinite(nll) or nll < 0:
        return f"nll_nats {nll!r} is not a finite non-negative number"
    for key in _COUNTS:
        v = row.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return f"{key} {v!r} is not a non-negative integer"
    if not isinstance(row.get("text_sha256"), str):
        return "it has no text_sha256"
    return ""


def _diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: checkpoint has {a.get(k)!r}, this run has {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def read_checkpoint(path: str | os.PathLike, fingerprint: dict) -> dict[int, dict]:
    """The rows of a checkpoint written for `fingerprint`, by document index, every line verified.

    ValueError if the file is not an lmloss checkpoint, belongs to another configuration (the keys
    that differ are named), has a corrupt line anywhere but a torn last one, a malformed row, or
    a document index twice. A file with no complete line (killed while writing its header) has no rows.
    """
    path = Path(path)
    lines, _ = _lines(path)
    fingerprint = json.loads(json.dumps(fingerprint))  # normalized as it reads back
    rows: dict[int, dict] = {}
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _corrupt(path, n, f"not JSON: {e}", len(lines)) from None
        if n == 1 and (not isinstance(obj, dict) or obj.get("kind") != _KIND):
            kind = obj.get("kind") if isinstance(obj, dict) else None
            raise ValueError(f"{path} is not an lmloss checkpoint of this version (header kind {kind!r}, "
                             f"expected {_KIND!r}); delete it to start over (scripts/eval.py: --overwrite)")
        if not isinstance(obj, dict) or _checksum({k: v for k, v in obj.items() if k != "checksum"}) != obj.get("checksum"):
            raise _corrupt(path, n, "its checksum does not match its content", len(lines))
        if n == 1:
            diffs = _diff(obj.get("fingerprint", {}), fingerprint)
            if diffs:
                raise ValueError(f"cannot resume from {path}: it belongs to another configuration\n  "
                                 + "\n  ".join(diffs)
                                 + "\nRerun with the same settings, or delete it to start over "
                                 "(scripts/eval.py: --overwrite).")
            continue
        del obj["checksum"]
        why = _check_row_fields(obj)
        if why:
            raise _corrupt(path, n, f"malformed row: {why}", len(lines))
        if obj["index"] in rows:
            raise _corrupt(path, n, f"document {obj['index']} is recorded twice", len(lines))
        rows[obj["index"]] = obj
    return rows  # a file killed before its header was complete holds no rows


def check_rows(rows: Mapping[int, dict], documents: Sequence, *, counts: bool = True) -> None:
    """ValueError unless every row's index is in range and its text hash and byte, word and
    character counts match that document (the corpus is the one the checkpoint was written for).
    counts=False checks the hash only: under plan "chunks" a row counts the scored text's bytes."""
    for i, row in rows.items():
        if not 0 <= i < len(documents):
            raise ValueError(f"checkpoint row for document {i} is out of range: the corpus has "
                             f"{len(documents)} documents. Delete it to start over (scripts/eval.py: --overwrite).")
        doc = documents[i]
        want = dict(text_sha256=text_sha256(doc.text))
        if counts:
            want.update(n_bytes=doc.n_bytes, n_words=doc.n_words, n_chars=doc.n_chars)
        bad = [f"{k}: checkpoint {row.get(k)!r}, corpus {v!r}" for k, v in want.items() if row.get(k) != v]
        if bad:
            raise ValueError(f"checkpoint row for document {i} does not match that document of the "
                             f"corpus ({'; '.join(bad)}): the corpus changed since the checkpoint was "
                             "written. Delete it to start over (scripts/eval.py: --overwrite).")


def fingerprint(model_name: str, tokenizer, documents: Sequence, *, plan: str, max_length: int,
                stride: int | None, prefix_id: int | None, every_window: bool, dtype: str,
                head_impl: str, **options) -> dict:
    """What must match for a checkpoint's rows to belong to a run: the corpus by content (its
    documents' text hashes) and every setting that changes a number. Batch size, device and the
    number of processes change only float rounding and may differ on resume. `options` (score_from,
    max_chunks, bos_in_tokens) enter only when set, so older checkpoints keep their fingerprint."""
    from lmloss import __version__

    return dict(model=model_name, tokenizer=getattr(tokenizer, "name", None), n_documents=len(documents),
                corpus_sha256=corpus_sha256(documents), plan=plan, max_length=max_length,
                stride=stride, prefix_id=prefix_id, every_window=every_window, dtype=dtype,
                head_impl=head_impl, lmloss=__version__,
                **{k: v for k, v in sorted(options.items()) if v not in (None, False)})


def restore(checkpoint: str | os.PathLike, fp: dict, documents: Sequence) -> dict[int, dict]:
    """The documents every rank's file of `checkpoint` holds for this run, each line verified and
    each row checked against its document; {} when there is no file. ValueError otherwise."""
    done: dict[int, dict] = {}
    for path in checkpoint_files(checkpoint):
        rows = read_checkpoint(path, fp)
        twice = sorted(set(rows) & set(done))
        if twice:
            raise ValueError(f"documents {twice[:5]} are recorded in two files of checkpoint {checkpoint} "
                             f"(one is {path}); delete them to start over")
        done.update(rows)
    check_rows(done, documents, counts=fp.get("plan") != "chunks")
    return done


class Checkpoint:
    """Append-only, fsynced record of finished documents for one run configuration.

    keep=False starts the file anew (header only); keep=True appends to the file as it is, after
    dropping a torn last line (read and verify it with read_checkpoint first); a file without a
    complete header line is started anew either way.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict, *, keep: bool = False):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.n_appended = 0
        lines, good = _lines(self.path) if keep and self.path.is_file() else ([], 0)
        if lines:  # a header at least: drop a torn last line, then append
            with open(self.path, "r+b") as f:
                f.truncate(good)
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")
            self._write({"kind": _KIND, "fingerprint": self.fingerprint})

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps({**obj, "checksum": _checksum(obj)}, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, row: dict) -> None:
        """Record one finished document's row (index, nll_nats, counts, text_sha256), durably."""
        why = _check_row_fields(row)
        if why:
            raise ValueError(f"not a document row: {why}")
        self._write(row)
        self.n_appended += 1

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
