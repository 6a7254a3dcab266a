"""`lmloss cache` (also `python -m lmloss cache`): the folder of converted GGUF models and tokenizers
(lmloss.gguf_cache), about 4 bytes per parameter for a model.

    lmloss cache list                    # entries, least recently used first: last use, size, part, source file
    lmloss cache clear                   # remove every entry that no running process is reading
    lmloss cache clear --older-than 30   # only the entries unused for 30 days
    lmloss cache dir                     # the folder: $LMLOSS_CACHE_DIR, else $XDG_CACHE_HOME/lmloss, else ~/.cache/lmloss
    du -sh "$(lmloss cache dir)"

The cache evicts by itself: after each write, the least recently used entries go until the entries
fit in $LMLOSS_CACHE_MAX_GB (default 20; 0 keeps nothing new, inf sets no limit). An entry that a
running process is reading is never removed (clear says which it kept). Exit code 0 done; 2 for a bad
option or $LMLOSS_CACHE_MAX_GB, as one line "error: ..." (--debug shows the traceback).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from lmloss import cache_folder
from lmloss.cache_folder import CacheEntry, cache_entries, cache_root, remove_entry
from lmloss.gguf_cache import cache_max_bytes

__all__ = ["build_parser", "parse_args", "run", "main"]


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = math.nan
    if not (days >= 0 and math.isfinite(days)):
        raise argparse.ArgumentTypeError(f"expected a number of days >= 0 such as 30 or 0.5, got {text!r}")
    return days


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    p = argparse.ArgumentParser(prog="lmloss cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True, metavar="{list,clear,dir}")
    actions.add_parser("list", parents=[common], help="entries, least recently used first")
    clear = actions.add_parser("clear", parents=[common], help="remove entries no running process is reading")
    clear.add_argument("--older-than", type=_days, metavar="DAYS",
                       help="remove only the entries last used more than DAYS days ago")
    actions.add_parser("dir", parents=[common], help="print the cache folder")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _size(n_bytes: float) -> str:
    """Decimal units, as LMLOSS_CACHE_MAX_GB counts them: 517.3 MB, 1.02 GB."""
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.2f} GB"
    if n_bytes >= 1e6:
        return f"{n_bytes / 1e6:.1f} MB"
    return f"{n_bytes / 1e3:.1f} kB"


def _limit() -> str:
    max_bytes = cache_max_bytes()
    if max_bytes == math.inf:
        return "no limit (LMLOSS_CACHE_MAX_GB=inf)"
    if max_bytes == 0:
        return "limit 0: nothing new is kept (LMLOSS_CACHE_MAX_GB=0)"
    return f"limit {max_bytes / 1e9:g} GB (LMLOSS_CACHE_MAX_GB)"


def _label(e: CacheEntry) -> str:
    return f"{Path(e.source).name} ({e.part})"


def list_entries() -> None:
    limit = _limit()  # a bad LMLOSS_CACHE_MAX_GB is an error before anything is printed
    where = cache_root() / "gguf"
    entries = cache_entries()
    if not entries:
        print(f"no entries in {where}; {limit}")
        return
    print(f"{'last use':16s}  {'size':>9s}  {'part':9s}  source")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_use_s))
        print(f"{used:16s}  {_size(e.n_bytes):>9s}  {e.part:9s}  {Path(e.source).name}")
    total = sum(e.n_bytes for e in entries)
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {_size(total)} in {where}; {limit}")


def clear(older_than_days: float | None) -> None:
    where = cache_root() / "gguf"
    now = time.time()
    removed, in_use, recent = [], [], []
    for e in cache_entries():
        if older_than_days is not None and now - e.last_use_s <= older_than_days * 86400:
            recent.append(e)
        elif remove_entry(e.folder):
            removed.append(e)
        elif e.folder.exists():
            in_use.append(e)
    if where.is_dir():
        cache_folder.sweep(where)  # what killed processes left: stale .tmp-* and .trash-* folders
    print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} "
          f"({_size(sum(e.n_bytes for e in removed))}) from {where}")
    if recent:
        print(f"kept {len(recent)} used in the last {older_than_days:g} days")
    if in_use:
        print(f"kept {len(in_use)} that a running process is reading: {', '.join(map(_label, in_use))}; "
              "run `lmloss cache clear` again once it is done")


def run(args) -> None:
    root = cache_root()
    for where in (root, root / "gguf"):  # a file in the way would read as an empty cache
        if where.exists() and not where.is_dir():
            raise ValueError(f"the cache folder {where} is a file, expected a folder (or nothing); point "
                             "LMLOSS_CACHE_DIR at a folder, or move the file away")
    if args.action == "list":
        list_entries()
    elif args.action == "clear":
        clear(args.older_than)
    else:
        print(cache_root())


def main(argv=None) -> int:
    """Exit code: 0 done, 2 a bad option or LMLOSS_CACHE_MAX_GB (one line on stderr; --debug shows
    the traceback), 1 an unexpected error."""
    from lmloss.cli import run_reporting_errors

    return run_reporting_errors(run, parse_args(argv))
