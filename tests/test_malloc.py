"""lmloss.malloc: a command's process keeps freed memory mapped; a user's process is left alone."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from lmloss import cli, malloc

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process: a 256 MiB tensor (its pages touched) and how much resident memory its free gave
# back; then ten more allocate-touch-free cycles of 64 MiB and the page faults they took.
_PROBE = r"""
import json, resource, sys, torch
from lmloss import malloc
mode = malloc.keep_freed_memory() if sys.argv[1] == "keep" else malloc.mode()
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
x = torch.ones(256 << 20, dtype=torch.uint8)
before = rss()
del x
returned = before - rss()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    y = torch.ones(64 << 20, dtype=torch.uint8)
    del y
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps(dict(mode=mode, returned_mib=returned / 2**20, cycle_faults=faults)))
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/status").exists(),
                                reason="glibc's mallopt and /proc")


def _probe(how: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LMLOSS_MALLOC"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, how], env={**clean, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc_only
def test_kept_memory_is_not_returned_and_is_reused():
    kept = _probe("keep")
    assert kept["mode"] == "keep"
    assert kept["returned_mib"] < 16  # the free kept the 256 MiB mapped...
    # ...and 640 MiB of allocations after it took no fresh pages: with 4 KiB pages a fresh 64 MiB block
    # faults 16384 times, and even with 2 MiB transparent huge pages 32 times, on each cycle
    assert kept["cycle_faults"] < 32


@glibc_only
def test_glibc_defaults_return_big_blocks():
    # The property keep_freed_memory changes: without it, a 256 MiB block is unmapped on free.
    default = _probe("none")
    assert default["mode"] == "default"
    assert default["returned_mib"] > 200
    assert default["cycle_faults"] >= 10 * 32  # each cycle faults fresh pages in


@glibc_only
@pytest.mark.parametrize("env, reason", [
    ({"LMLOSS_MALLOC": "default"}, "LMLOSS_MALLOC=default"),
    ({"MALLOC_MMAP_MAX_": "65536"}, "MALLOC_MMAP_MAX_ is set"),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "MALLOC_TRIM_THRESHOLD_ is set"),
])
def test_the_users_choice_is_left_alone(env, reason):
    res = _probe("keep", **env)
    assert reason in res["mode"] and res["mode"].startswith("default")
    if "LMLOSS_MALLOC" in env:  # glibc's own settings: the block goes back
        assert res["returned_mib"] > 200


def test_a_bad_setting_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("LMLOSS_MALLOC", "sometimes")
    with pytest.raises(ValueError, match=r"LMLOSS_MALLOC='sometimes': expected one of keep, default"):
        malloc.keep_freed_memory()


def test_the_command_line_reports_a_bad_setting_without_a_traceback():
    env = {**os.environ, "LMLOSS_MALLOC": "sometimes"}
    proc = subprocess.run([sys.executable, "-m", "lmloss", "cache", "dir"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: LMLOSS_MALLOC='sometimes'") and "Traceback" not in proc.stderr


def test_main_called_with_argv_leaves_the_process_alone(monkeypatch, capsys):
    # A test or a user's script calling main([...]) is not the command's own process.
    monkeypatch.setattr(malloc, "_mode", "default")
    monkeypatch.setenv("LMLOSS_MALLOC", "sometimes")  # would raise if setup_process ran
    assert cli.main(["cache", "dir"]) == 0
    assert malloc.mode() == "default"
