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

Where: $LMLOSS_CACHE_DIR, else $XDG_CACHE_HOME/lmloss, else ~/.cache/lmloss. Nothing is evicted;
delete the folder to get the space back (about 4 bytes per parameter for a model).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Callable, TypeVar

__all__ = ["FORMAT", "cache_root", "entry_folder", "gguf_fingerprint", "load_cached"]

FORMAT = 1  # bump when what an entry holds changes: older entries then miss
_MIB = 2**20
_HASHED_FILE_BYTES = 64 * _MIB  # files up to this size are checked by sha256 at each load
_STALE_TEMP_S = 3600.0  # a .tmp-* folder untouched this long belongs to a process that died
T = TypeVar("T")


def cache_root() -> Path:
    """$LMLOSS_CACHE_DIR, else $XDG_CACHE_HOME/lmloss, else ~/.cache/lmloss (read at each call)."""
    if os.environ.get("LMLOSS_CACHE_DIR"):
        return Path(os.environ["LMLOSS_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lmloss"
    return Path.home() / ".cache" / "lmloss"


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
        raise ValueError(f"GGUF file {path} changed while it was read; load it again once it is complete")
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
    entry is written first when missing, and rewritten when stale, partial or unreadable (read raises:
    a warning says why). Raises check_gguf's ValueError for a missing, truncated or non-GGUF file
    before anything is written, and ValueError when the entry cannot be written."""
    write = {"model": _write_model, "tokenizer": _write_tokenizer}.get(part)
    if write is None:
        raise ValueError(f"unknown cache part {part!r}; expected 'model' or 'tokenizer'")
    path = Path(path).expanduser()
    inputs = gguf_fingerprint(path)
    entry = entry_folder(path, inputs) / part
    if entry.exists():
        problem = _problem(entry, part, inputs)
        if problem is None:
            try:
                return read(entry)
            except Exception as err:  # a corrupt safetensors file, a config transformers refuses, ...
                problem = f"reading it failed ({type(err).__name__}: {str(err)[:300]})"
        warnings.warn(f"lmloss cache entry {entry} (for {path}) is unusable, rebuilding it: {problem}",
                      RuntimeWarning, stacklevel=2)
        _discard(entry)
    try:
        _build(path, part, inputs, entry, write)
    except OSError as err:  # a full disk, a read-only or misplaced cache folder
        raise ValueError(f"could not write the cache entry {entry} for {path} ({type(err).__name__}: {err}); "
                         "free disk space, set LMLOSS_CACHE_DIR to a writable folder, or load with "
                         "cache=False") from err
    return read(entry)


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


def _build(path: Path, part: str, inputs: dict, entry: Path, write: Callable[[Path, Path], None]) -> None:
    """write() into a temporary folder, then manifest.json, fsync, and rename it to `entry`; if another
    process renamed its own there first, keep that one."""
    gguf_dir = entry.parent.parent
    gguf_dir.mkdir(parents=True, exist_ok=True)
    _sweep(gguf_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{part}-", dir=gguf_dir))
    try:
        write(path, tmp)
        now = path.stat()
        if (now.st_size, now.st_mtime_ns) != (inputs["size"], inputs["mtime_ns"]):
            raise ValueError(f"GGUF file {path} changed while it was converted; load it again once it is complete")
        files = sorted(f for f in tmp.rglob("*") if f.is_file())
        manifest = {"format": FORMAT, "part": part, "source": str(path), "inputs": inputs,
                    "files": {f.relative_to(tmp).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
                              for f in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for f in [*files, tmp / "manifest.json"]:
            _fsync(f)
        _fsync(tmp)
        entry.parent.mkdir(exist_ok=True)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.exists():
                raise
            # another process published this entry while we converted: both are the same conversion
        else:
            _fsync(entry.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def _discard(entry: Path) -> None:
    """Move the entry out of the way in one rename (no reader sees half of it), then delete it."""
    trash = entry.parent.parent / f".trash-{os.getpid()}-{time.time_ns()}"
    try:
        os.rename(entry, trash)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(trash, ignore_errors=True)


def _sweep(gguf_dir: Path) -> None:
    """Delete what killed processes left: .trash-* folders, and .tmp-* folders untouched for an hour."""
    now = time.time()
    for d in gguf_dir.glob(".t*-*"):
        try:
            newest = max([d.stat().st_mtime, *(f.stat().st_mtime for f in d.iterdir())])
        except OSError:  # removed meanwhile by its owner
            continue
        if d.name.startswith(".trash-") or (d.name.startswith(".tmp-") and now - newest > _STALE_TEMP_S):
            shutil.rmtree(d, ignore_errors=True)


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
