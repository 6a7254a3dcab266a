"""Result files: checked before any work, written all at once.

    check_output_path("--output", "results.json", suffixes=(".json",))   # before loading anything
    write_atomic("results.json", data)                                   # after the run
    write_all([("results.json", lambda tmp: tmp.write_bytes(data)),      # several files, in order
               ("plot.png", lambda tmp: fig.savefig(tmp))])

A results file is never half-written: its bytes go to a temporary file in the same folder (named
after the target, with the target's suffix), which is fsynced, given an ordinary file's mode
(0o666 & ~umask; mkstemp makes 0o600) and renamed over the target, so a reader sees the old file or
the new one, never a torn one. write_all writes several such files one after the other; an error
after the first says which are already written, complete.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["check_output_path", "write_atomic", "write_all"]


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


def _replace_atomically(path: str | os.PathLike, writer: Callable[[Path], object]) -> None:
    """writer(tmp) writes the whole file at tmp (a new, empty file beside the target with the
    target's suffix, so that writers that pick a format by suffix pick the target's); then tmp is
    fsynced, given an ordinary file's mode and renamed over `path`. A failure anywhere leaves `path`
    as it was and no temporary file behind."""
    target = _target(path)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        writer(tmp)
        fd = os.open(tmp, os.O_RDONLY)  # the writer may have replaced tmp: sync what is there now
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Path(path).write_bytes(data), all or nothing (see the module docstring). A failure leaves
    `path` as it was and no temporary file behind."""
    _replace_atomically(path, lambda tmp: tmp.write_bytes(data))


def write_all(items: Sequence[tuple[str | os.PathLike, Callable[[Path], object]]], *,
              written: list[str] | None = None,
              on_written: Callable[[str], object] | None = None) -> list[str]:
    """Write the files of `items` in order, each all or nothing; return the paths written.

    items: (path, writer) pairs; writer(tmp) writes the whole file at tmp, a temporary path beside
    `path` with its suffix (Path.write_bytes, np.savez on open(tmp, "wb"), fig.savefig(tmp), ...),
    renamed over `path` once complete (the module docstring). Once a file is complete its path, as
    str(path), is appended to `written` (a new list unless given: pass one to learn what was written
    when an error comes; paths already in it count as written) and then on_written(path) is called
    (e.g. to print where it went).

    An error while no file is written propagates as it is, and the failing file is left as it was.
    An error after the first file is written becomes ValueError("<type>: <message> (already written,
    complete: a.json, b.npz)") raised from it: the files listed are whole, the failing one and those
    after it are as they were."""
    written = [] if written is None else written
    try:
        for path, writer in items:
            _replace_atomically(path, writer)
            written.append(str(path))
            if on_written is not None:
                on_written(str(path))
    except Exception as err:
        if not written:
            raise
        raise ValueError(f"{type(err).__name__}: {err} (already written, complete: {', '.join(written)})") from err
    return written
