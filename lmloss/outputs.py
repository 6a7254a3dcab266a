"""Result files: checked before any work, written all at once.

    check_output_path("--output", "results.json", suffixes=(".json",))   # before loading anything
    write_atomic("results.json", data)                                   # after the run

A results file is never half-written: write_atomic writes a temporary file in the same folder,
fsyncs it, gives it an ordinary file's mode (0o666 & ~umask; mkstemp makes 0o600) and renames it
over the target, so a reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["check_output_path", "write_atomic"]


def _target(value: str | os.PathLike) -> Path:
    """The file an output option writes: a symlink is followed, so that the link is kept."""
    return Path(os.path.realpath(Path(value).expanduser()))


def check_output_path(option: str, value: str | os.PathLike, *, suffixes: tuple[str, ...] = ()) -> None:
    """ValueError unless `value` can take the output of `option`: not a folder, ending in one of
    `suffixes` (when given), a regular file or a new name, in an existing folder this process can
    write to."""
    path = Path(value).expanduser()
    example = suffixes[0] if suffixes else ".json"
    if path.is_dir():
        raise ValueError(f"{option} {str(value)!r} is a folder; expected a file path, e.g. {path / ('results' + example)}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{option} {str(value)!r} does not end in {' or '.join(suffixes)}; pass e.g. "
                         f"{path.parent / (path.stem + example)}")
    if path.exists() and not path.is_file():  # stat follows links: /dev/stdout is a pipe or a tty
        raise ValueError(f"{option} {str(value)!r} is not a regular file; the output replaces the file at "
                         "that path, so pass the path of a regular file or a new name")
    target = _target(value)
    if not target.parent.is_dir():
        raise ValueError(f"{option} {str(value)!r}: {target.parent} is not an existing folder; create it "
                         f"(mkdir -p {target.parent}) or pass a path in an existing folder")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {str(value)!r}: folder {target.parent} is not writable; pass a path in a "
                         "folder you can write to")


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it portably; set straight back
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Path(path).write_bytes(data), all or nothing (see the module docstring). A failure leaves
    `path` as it was and no temporary file behind."""
    target = _target(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
