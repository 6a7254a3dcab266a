"""A disk cache of GGUF files converted for transformers, so that a process loads a GGUF model in
seconds instead of dequantizing it again (~25 s for SmolLM2-135M on 2 cores, every process).

    module = load_cached("SmolLM2-135M-Instruct.Q4_1.gguf", "model", read)   # read(folder) -> anything
    # read gets cache_root() / "gguf" / "SmolLM2-135M-Instruct.Q4_1-<key>" / "model"

An entry is a folder from_pretrained reads. "model": config.json and the float32 weights that
transformers' GGUF loader produces, as safetensors; loading them in any dtype gives the weights that
loading the GGUF file in that dtype gives, bit for bit (float32 -> dtype is the same one rounding).
"tokenizer": the files of the GGUF tokenizer's save_pretrained.

Key: sha256 of what identifies the file cheaply: its size, its mtime, the sha256 of its header
(metadata and tensor table) plus the first and last MiB of its tensor data, the versions of
transformers and gguf that convert it, and this cache's FORMAT. An edited, replaced or re-downloaded
file gets a new entry. Not noticed: an edit inside the tensor data, away from both ends, that keeps
the size and the mtime (touch the file, or load with cache=False).

Trust: an entry is written into a temporary folder beside the entries, flushed to disk and renamed
into place, so a killed process leaves no entry, only a .tmp-* folder (removed an hour later). On each
load its manifest.json must hold the key's inputs, every file the size it was written with (and files
up to 64 MiB their sha256), and read() must succeed; otherwise the entry is removed and rebuilt. Two
processes converting one file at once both succeed: the later rename finds the entry and uses it.

Size: $LMLOSS_CACHE_MAX_GB (1 GB = 1e9 bytes, default 20: about 5e9 float32 parameters, so several
small models or one of up to ~5B fit, while a disk of a few hundred GB keeps most of its room). After
each write, the least recently used entries go until the entries' sizes sum to at most the limit:
use = the mtime of the entry's .used file, touched by each load that reads the entry, so eviction
follows use, not creation. The entry just written stays even when it alone exceeds the limit (one
warning says so; the next write removes it). 0 keeps nothing new: a load converts into a temporary
folder, reads it and deletes it, while entries already there are still read (`lmloss cache clear`
removes them); inf sets no limit. `lmloss cache list|clear|dir` shows and empties the cache.

Concurrent readers (the locks and the eviction are in lmloss/cache_folder.py): a reader holds a shared
flock on the entry's .used from before it checks the entry until read() returns; eviction and `lmloss
cache clear` take it exclusively without waiting, skip an entry another process holds, and remove an
entry by renaming it away in one step while they hold the lock. A reader that was waiting then finds
the entry gone and converts again, and one whose entry is deleted under it anyway (`rm -rf`, or a file
system without locks: NFS without lockd, Windows) warns and converts again; files a reader has
already opened or mmap'ed stay readable after their removal (POSIX).

Where: $LMLOSS_CACHE_DIR, else $XDG_CACHE_HOME/lmloss, else ~/.cache/lmloss (about 4 bytes per
parameter for a model).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Callable, TypeVar

from lmloss import cache_folder
from lmloss.cache_folder import cache_root

__all__ = ["DEFAULT_MAX_GB", "FORMAT", "CacheError", "cache_max_bytes", "entry_folder", "gguf_fingerprint",
           "load_cached"]

FORMAT = 1  # bump when what an entry holds changes: older entries then miss
DEFAULT_MAX_GB = 20.0  # $LMLOSS_CACHE_MAX_GB when unset: ~5e9 float32 parameters (a 7B model needs 28)
_MIB = 2**20
_HASHED_FILE_BYTES = 64 * _MIB  # files up to this size are checked by sha256 at each load
T = TypeVar("T")


class CacheError(ValueError):
    """A problem of the cache itself (its settings, writing an entry, a file changing while read), not
    of the GGUF file's contents: callers that wrap reading errors as "the file may be corrupt" let it
    through as it is."""


def cache_max_bytes() -> float:
    """$LMLOSS_CACHE_MAX_GB * 1e9 (read at each call; unset or empty: DEFAULT_MAX_GB): 0.0 keeps nothing
    new, math.inf ("inf") sets no limit. Raises ValueError for anything but a number >= 0."""
    raw = os.environ.get("LMLOSS_CACHE_MAX_GB", "").strip()
    if not raw:
        return DEFAULT_MAX_GB * 1e9
    try:
        max_gb = float(raw)
    except ValueError:
        max_gb = math.nan
    if not max_gb >= 0:  # also nan
        raise CacheError(f"LMLOSS_CACHE_MAX_GB={raw!r} is not a size in gigabytes: expected a number >= 0 such as "
                         f"20 or 0.5 (0 keeps nothing new, inf sets no limit); set it to one, or unset it for the "
                         f"default of {DEFAULT_MAX_GB:g}")
    return max_gb * 1e9


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def gguf_fingerprint(path) -> dict:
    """The cache key's inputs for a GGUF file: {"format", "size", "mtime_ns", "head_sha256",
    "transformers", "gguf"}, head_sha256 = sha256(header + first MiB + last MiB of tensor data).
    Raises check_gguf's ValueError for a missing, truncated or non-GGUF file."""
    from lmloss.models import _gguf_header

    path = Path(path).expanduser()
    _meta, data_start = _gguf_header(path)
    before = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(data_start + _MIB))  # metadata, tensor table, first MiB of tensor data
        f.seek(max(f.tell(), before.st_size - _MIB))
        digest.update(f.read(_MIB))  # last MiB (what is left of it)
    after = path.stat()
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise CacheError(f"GGUF file {path} changed while it was read; load it again once it is complete")
    return {"format": FORMAT, "size": before.st_size, "mtime_ns": before.st_mtime_ns,
            "head_sha256": digest.hexdigest(), "transformers": _version("transformers"), "gguf": _version("gguf")}


def entry_folder(path, inputs: dict) -> Path:
    """cache_root() / "gguf" / f"{file stem}-{key}", key = sha256(json of inputs)[:24]: the folder that
    holds the entries ("model", "tokenizer") of one version of one file."""
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:64]
    return cache_root() / "gguf" / f"{stem}-{key}"


def load_cached(path, part: str, read: Callable[[Path], T]) -> T:
    """read(entry) for the cache entry of GGUF file `path` and `part` ("model" or "tokenizer"); the
    entry is written first when missing (then older entries are evicted down to cache_max_bytes()),
    and rewritten when stale, partial, unreadable or deleted while read (a warning says why). Raises
    check_gguf's ValueError for a missing, truncated or non-GGUF file and ValueError for a bad
    $LMLOSS_CACHE_MAX_GB, both before anything is written, and ValueError when the entry cannot be
    written."""
    write = {"model": _write_model, "tokenizer": _write_tokenizer}.get(part)
    if write is None:
        raise CacheError(f"unknown cache part {part!r}; expected 'model' or 'tokenizer'")
    max_bytes = cache_max_bytes()
    path = Path(path).expanduser()
    inputs = gguf_fingerprint(path)
    entry = entry_folder(path, inputs) / part
    with cache_folder.reading(entry) as found:  # while it is open, no eviction removes the entry
        if found:
            problem = _problem(entry, part, inputs)
            if problem is None:
                try:
                    result = read(entry)
                except Exception as err:  # a corrupt safetensors file, a config transformers refuses, ...
                    problem = f"reading it failed ({type(err).__name__}: {str(err)[:300]})"
                else:
                    cache_folder.record_use(entry)
                    return result
            if not entry.exists():
                warnings.warn(f"lmloss cache entry {entry} (for {path}) was deleted while this process read it "
                              "(by hand, or on a file system without locks); converting the file again",
                              RuntimeWarning, stacklevel=2)
            else:
                warnings.warn(f"lmloss cache entry {entry} (for {path}) is unusable, rebuilding it: {problem}",
                              RuntimeWarning, stacklevel=2)
                cache_folder.discard(entry)
    try:
        tmp = _convert(path, part, inputs, entry.parent.parent, write)
        lock = None if max_bytes == 0 else _publish(tmp, entry)  # _publish holds a lock: no eviction takes it
    except OSError as err:  # a full disk, a read-only or misplaced cache folder
        raise CacheError(f"could not write the cache entry {entry} for {path} ({type(err).__name__}: {err}); "
                         "free disk space, set LMLOSS_CACHE_DIR to a writable folder, or load with "
                         "cache=False") from err
    if max_bytes == 0:  # keep nothing new: read the conversion where it was written, then delete it
        try:
            return read(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        _evict_after_write(entry, max_bytes, path)
        return read(entry)
    finally:
        if lock is not None:
            os.close(lock)


def _evict_after_write(entry: Path, max_bytes: float, path: Path) -> None:
    """evict() down to max_bytes, keeping `entry`; one warning when `entry` alone is over the limit."""
    if max_bytes == math.inf:
        return
    cache_folder.evict(max_bytes, keep=entry)
    try:
        n_bytes = cache_folder.describe(entry).n_bytes
    except OSError:
        return
    if n_bytes > max_bytes:
        warnings.warn(f"the lmloss cache entry {entry} for {path.name} holds {n_bytes / 1e9:.2f} GB, more than "
                      f"LMLOSS_CACHE_MAX_GB={max_bytes / 1e9:g} allows; it is kept until the next entry is written "
                      "(every other entry not in use was removed). Set LMLOSS_CACHE_MAX_GB above "
                      f"{math.ceil(n_bytes / 1e9)} to keep it, or to 0 to keep no new entries",
                      RuntimeWarning, stacklevel=3)


# -- writing an entry ----------------------------------------------------------------------------

def _write_model(path: Path, folder: Path) -> None:
    """The GGUF file dequantized as load_model(path, cache=False) reads it, saved into folder:
    config.json and float32 model.safetensors."""
    import torch

    from lmloss.models import _from_pretrained

    module = _from_pretrained(str(path), torch.float32, **_dequantized())
    packed = sorted({type(m).__name__ for m in module.modules() if type(m).__name__.startswith("Gguf")})
    if packed:
        raise ValueError(f"transformers kept the weights of {path} packed ({', '.join(packed)}), which this "
                         "cache cannot store; load it with cache=False")
    # transformers refuses to save a model it read from a GGUF file (its quantizer "is not serializable")
    # although every weight is a plain float32 tensor here; without it config.json describes that model.
    if getattr(module, "hf_quantizer", None) is not None:
        module.hf_quantizer = None
    if hasattr(module.config, "quantization_config"):
        del module.config.quantization_config
    module.save_pretrained(folder)


def _dequantized() -> dict:
    """from_pretrained arguments that make transformers unpack every GGUF weight: transformers 5 may
    keep the blocks packed where the `kernels` package has a kernel for them."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _write_tokenizer(path: Path, folder: Path) -> None:
    """The GGUF file's tokenizer, as load_tokenizer(path, cache=False) builds it, saved into folder."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(path.parent.resolve()), gguf_file=path.name).save_pretrained(folder)


def _convert(path: Path, part: str, inputs: dict, gguf_dir: Path, write: Callable[[Path, Path], None]) -> Path:
    """write() into a new temporary folder in gguf_dir, then its manifest.json: that folder."""
    gguf_dir.mkdir(parents=True, exist_ok=True)
    cache_folder.sweep(gguf_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{part}-", dir=gguf_dir))
    try:
        write(path, tmp)
        now = path.stat()
        if (now.st_size, now.st_mtime_ns) != (inputs["size"], inputs["mtime_ns"]):
            raise CacheError(f"GGUF file {path} changed while it was converted; load it again once it is complete")
        files = sorted(f for f in tmp.rglob("*") if f.is_file())
        manifest = {"format": FORMAT, "part": part, "source": str(path), "inputs": inputs,
                    "files": {f.relative_to(tmp).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
                              for f in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _publish(tmp: Path, entry: Path) -> int | None:
    """fsync tmp, then rename it to `entry` while holding a shared lock on its .used, so that no eviction
    removes it before it is read; if another process published there first, lock and keep that one.
    Returns the lock's descriptor for the caller to close (None where no lock could be taken)."""
    lock = None
    try:
        for f in sorted(f for f in tmp.rglob("*") if f.is_file()):
            _fsync(f)
        _fsync(tmp)
        lock = cache_folder.open_used(tmp)
        if lock is not None:
            cache_folder.take_lock(lock, exclusive=False)
        for attempt in range(3):
            entry.parent.mkdir(exist_ok=True)
            try:
                os.rename(tmp, entry)
                break
            except FileNotFoundError:  # an eviction removed the emptied parent between mkdir and rename
                if attempt == 2:
                    raise
            except OSError:
                if not entry.exists():
                    raise
                # another process published this entry while we converted: both are the same conversion
                if lock is not None:
                    os.close(lock)
                lock = None
                with contextlib.suppress(FileNotFoundError):
                    lock = cache_folder.open_used(entry)
                    if lock is not None:
                        cache_folder.take_lock(lock, exclusive=False)
                return lock
        _fsync(entry.parent)
        return lock
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the files themselves were synced
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


# -- checking an entry ---------------------------------------------------------------------------

def _problem(entry: Path, part: str, inputs: dict) -> str | None:
    """Why the entry cannot be trusted, or None: its manifest must hold these inputs and part, and
    every file it lists the size (and, up to 64 MiB, the sha256) it was written with."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        return f"manifest.json is missing or unreadable ({type(err).__name__}: {err})"
    if not isinstance(manifest, dict) or manifest.get("inputs") != inputs or manifest.get("part") != part:
        return f"manifest.json describes another file, part or version, not {part!r} of {inputs}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest.json lists no files"
    for name, want in files.items():
        try:
            size = (entry / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if not isinstance(want, dict) or size != want.get("size"):
            return f"{name} has {size} bytes, not the {want.get('size') if isinstance(want, dict) else '?'} written"
        if size <= _HASHED_FILE_BYTES and _sha256(entry / name) != want.get("sha256"):
            return f"{name} changed since it was written (its sha256 differs)"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_MIB), b""):
            digest.update(block)
    return digest.hexdigest()
