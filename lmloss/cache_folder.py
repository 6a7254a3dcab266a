"""The lmloss cache folder and the entries in it: where it is, what each entry holds and when it was last
used, the locks that keep an entry a process is reading from being removed, and eviction.

    cache_root() / "gguf" / "<file stem>-<key>" / "model" | "tokenizer"     one entry (lmloss/gguf_cache.py
                                                                            writes and reads them)
    cache_root() / "native" / "native_cpu-<key>.so"                         the CPU loss kernels, built
                                                                            once per machine (lmloss/ops/native.py;
                                                                            ~30 KB each, not entries: never evicted)

Each entry holds a .used file: its mtime is the entry's last use (eviction goes least recently used
first), and a reader holds a shared flock on it from before it checks the entry until it has read it
(reading()). Removal (remove_entry(), evict(), `lmloss cache clear`) takes that lock exclusively
without waiting, skips an entry in use, and renames the entry out of the way in one step before
deleting it, so that no reader ever sees half an entry. Where locks are missing (no fcntl, or a file
system that refuses them) removals go ahead and a reader whose entry vanishes converts again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

try:
    import fcntl  # POSIX advisory locks (flock)
except ImportError:  # Windows: use is recorded, not locked; readers still fall back to converting
    fcntl = None

__all__ = ["CacheEntry", "cache_entries", "cache_root", "describe", "discard", "evict", "open_used",
           "reading", "record_use", "remove_entry", "sweep", "take_lock"]

STALE_TEMP_S = 3600.0  # a .tmp-* folder untouched this long belongs to a process that died
USED = ".used"  # in each entry: mtime = last use; a shared flock on it while a process reads the entry


def cache_root() -> Path:
    """$LMLOSS_CACHE_DIR, else $XDG_CACHE_HOME/lmloss, else ~/.cache/lmloss (read at each call)."""
    if os.environ.get("LMLOSS_CACHE_DIR"):
        return Path(os.environ["LMLOSS_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lmloss"
    return Path.home() / ".cache" / "lmloss"



def discard(entry: Path) -> None:
    """Move the entry out of the way in one rename (no reader sees half of it), then delete it."""
    trash = entry.parent.parent / f".trash-{os.getpid()}-{time.time_ns()}"
    try:
        os.rename(entry, trash)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(trash, ignore_errors=True)


def sweep(gguf_dir: Path) -> None:
    """Delete what killed processes left: .trash-* folders, and .tmp-* folders untouched for an hour."""
    now = time.time()
    for d in gguf_dir.glob(".t*-*"):
        try:
            newest = max([d.stat().st_mtime, *(f.stat().st_mtime for f in d.iterdir())])
        except OSError:  # removed meanwhile by its owner
            continue
        if d.name.startswith(".trash-") or (d.name.startswith(".tmp-") and now - newest > STALE_TEMP_S):
            shutil.rmtree(d, ignore_errors=True)


@dataclass(frozen=True)
class CacheEntry:
    """One entry: folder = cache_root() / "gguf" / "<stem>-<key>" / part."""

    folder: Path
    part: str
    source: str  # the GGUF file it was converted from, as the manifest names it ("?" when unreadable)
    n_bytes: int  # its files' sizes summed
    last_use_s: float  # unix time of the last load that read it (of its writing when never read)


def cache_entries() -> list[CacheEntry]:
    """Every entry under cache_root() / "gguf", least recently used first (temporaries aside)."""
    found = []
    gguf_dir = cache_root() / "gguf"
    for folder in sorted(gguf_dir.glob("*/*")):
        if folder.parent.name.startswith(".") or folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            found.append(describe(folder))
        except OSError:  # removed meanwhile
            continue
    return sorted(found, key=lambda e: e.last_use_s)


def describe(folder: Path) -> CacheEntry:
    try:
        source = str(json.loads((folder / "manifest.json").read_text())["source"])
    except (OSError, ValueError, KeyError, TypeError):
        source = "?"
    n_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    for marker in (folder / USED, folder / "manifest.json", folder):  # an entry of an older lmloss has no .used
        with contextlib.suppress(FileNotFoundError):
            return CacheEntry(folder, folder.name, source, n_bytes, marker.stat().st_mtime)
    raise FileNotFoundError(folder)


def evict(max_bytes: float, *, keep: Path | None = None) -> list[CacheEntry]:
    """Remove entries, least recently used first, until their sizes sum to at most max_bytes; never
    `keep` nor an entry that a process is reading (remove_entry). Returns the removed entries."""
    entries = cache_entries()
    total = sum(e.n_bytes for e in entries)
    keep = None if keep is None else Path(keep).resolve()
    removed = []
    for e in entries:
        if total <= max_bytes:
            break
        if e.folder.resolve() == keep:
            continue
        try:
            gone = remove_entry(e.folder)
        except OSError:  # a folder this user may not delete: the next one may go
            continue
        if gone:
            total -= e.n_bytes
            removed.append(e)
    return removed


def remove_entry(folder) -> bool:
    """Remove one entry, unless a process is reading it (holds the shared lock on its .used): under an
    exclusive lock, renamed out of the way in one step, then deleted; its parent goes too once empty.
    True if this call removed it; False if it is in use or gone already. OSError if it cannot be moved."""
    folder = Path(folder)
    try:
        lock = open_used(folder)
    except FileNotFoundError:
        return False
    try:
        if lock is not None and not (take_lock(lock, exclusive=True) and same_file(lock, folder / USED)):
            return False  # in use, or removed and written again since it was opened
        trash = folder.parent.parent / f".trash-{os.getpid()}-{time.time_ns()}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return False
    finally:
        if lock is not None:
            os.close(lock)
    shutil.rmtree(trash, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()  # only when empty: the other part may still be there
    return True


@contextlib.contextmanager
def reading(entry: Path) -> Iterator[bool]:
    """Holds a shared lock on entry/.used while open: no eviction removes the entry meanwhile. Gives
    False when there is no entry (also when one was evicted while this waited for the lock)."""
    try:
        lock = open_used(entry)
    except FileNotFoundError:
        yield False
        return
    try:
        yield lock is None or (take_lock(lock, exclusive=False) and same_file(lock, entry / USED))
    finally:
        if lock is not None:
            os.close(lock)


def record_use(entry: Path) -> None:
    """Touch entry/.used: eviction goes by its mtime."""
    with contextlib.suppress(OSError):  # a read-only cache is still read
        os.utime(entry / USED)


def open_used(entry: Path) -> int | None:
    """A descriptor of entry/.used, created if missing; None where it can be neither created nor opened
    (a read-only cache: such an entry is read unlocked). FileNotFoundError when there is no entry."""
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            return os.open(entry / USED, flags, 0o644)
        except OSError:
            if not entry.is_dir():
                raise FileNotFoundError(f"no cache entry {entry}") from None
    return None


def take_lock(fd: int, *, exclusive: bool) -> bool:
    """flock fd: shared (waiting out an evictor's brief exclusive hold) or exclusive without waiting.
    False only when another process holds it; True also where locks are missing (no fcntl, or a file
    system that refuses them): there, removals go ahead and readers fall back to converting."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX | fcntl.LOCK_NB) if exclusive else fcntl.LOCK_SH)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def same_file(fd: int, path: Path) -> bool:
    """Whether fd is still the file at path (not one renamed away, replaced or deleted since)."""
    try:
        here = os.stat(path)
    except OSError:
        return False
    there = os.fstat(fd)
    return (here.st_ino, here.st_dev) == (there.st_ino, there.st_dev)
