"""`lmloss cache list|clear|dir` (lmloss.cli_cache): what list prints, what clear removes and keeps
(entries a process is reading, entries used recently with --older-than), the exit codes, and the
errors for a bad option or LMLOSS_CACHE_MAX_GB. Entries are fake (a manifest and zeros) except in
the test that converts a tiny GGUF file (tests/test_gguf_cache.py writes it)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmloss import cache_folder, cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("LMLOSS_CACHE_DIR", str(folder))
    monkeypatch.delenv("LMLOSS_CACHE_MAX_GB", raising=False)
    return folder


def _entry(cache: Path, name: str, part: str, n_bytes: int, used_days_ago: float) -> Path:
    """A fake entry of n_bytes of weights (plus its small manifest), last used used_days_ago."""
    folder = cache / "gguf" / f"{name}-{'0' * 24}" / part
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * n_bytes)
    (folder / "manifest.json").write_text(json.dumps({"source": f"/models/{name}.gguf", "part": part}))
    t = time.time() - used_days_ago * 86400
    (folder / ".used").touch()
    os.utime(folder / ".used", (t, t))
    return folder


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["cache", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_dir_prints_the_cache_folder_and_is_registered(cache_dir, capsys):
    assert _run(capsys, "dir") == (0, f"{cache_dir}\n", "")
    assert not cache_dir.exists()  # printing it creates nothing
    assert cli.main(["--help"]) == 0 and re.search(r"\n  cache\s+list or clear", capsys.readouterr().out)


def test_list_shows_entries_least_recently_used_first(cache_dir, capsys):
    _entry(cache_dir, "SmolLM2-135M", "model", 2_000_000, used_days_ago=1)
    _entry(cache_dir, "SmolLM2-135M", "tokenizer", 3_000, used_days_ago=0.1)
    _entry(cache_dir, "gemma-3-270m", "model", 5_000_000, used_days_ago=40)
    code, out, err = _run(capsys, "list")
    assert code == 0 and err == ""
    header, *rows, footer = out.splitlines()
    assert header.split() == ["last", "use", "size", "part", "source"]
    assert [r.split()[-2:] for r in rows] == [["model", "gemma-3-270m.gguf"], ["model", "SmolLM2-135M.gguf"],
                                             ["tokenizer", "SmolLM2-135M.gguf"]]
    forty_days_ago = time.strftime("%Y-%m-%d", time.localtime(time.time() - 40 * 86400))
    assert rows[0].startswith(forty_days_ago) and "5.0 MB" in rows[0] and "2.0 MB" in rows[1] and "3.1 kB" in rows[2]
    total = sum(e.n_bytes for e in cache_folder.cache_entries())
    assert footer == f"3 entries, {total / 1e6:.1f} MB in {cache_dir / 'gguf'}; limit 20 GB (LMLOSS_CACHE_MAX_GB)"


@pytest.mark.parametrize("value, says", [("inf", "no limit (LMLOSS_CACHE_MAX_GB=inf)"),
                                         ("0", "limit 0: nothing new is kept (LMLOSS_CACHE_MAX_GB=0)"),
                                         ("2.5", "limit 2.5 GB (LMLOSS_CACHE_MAX_GB)")])
def test_list_of_an_empty_cache_says_where_and_the_limit(cache_dir, capsys, monkeypatch, value, says):
    monkeypatch.setenv("LMLOSS_CACHE_MAX_GB", value)
    assert _run(capsys, "list") == (0, f"no entries in {cache_dir / 'gguf'}; {says}\n", "")


def test_a_bad_limit_is_an_error_with_exit_code_2(cache_dir, capsys, monkeypatch):
    _entry(cache_dir, "a", "model", 10, used_days_ago=1)
    monkeypatch.setenv("LMLOSS_CACHE_MAX_GB", "20G")
    code, out, err = _run(capsys, "list")
    assert (code, out) == (2, "")
    assert err == ("error: LMLOSS_CACHE_MAX_GB='20G' is not a size in gigabytes: expected a number >= 0 such as 20 "
                   "or 0.5 (0 keeps nothing new, inf sets no limit); set it to one, or unset it for the default of 20\n")


def test_clear_removes_every_entry_and_what_killed_processes_left(cache_dir, capsys):
    a = _entry(cache_dir, "a", "model", 1_000_000, used_days_ago=1)
    _entry(cache_dir, "a", "tokenizer", 500_000, used_days_ago=1)
    _entry(cache_dir, "b", "model", 2_000_000, used_days_ago=100)
    total = sum(e.n_bytes for e in cache_folder.cache_entries())
    stale, live = cache_dir / "gguf" / ".tmp-model-dead", cache_dir / "gguf" / ".tmp-model-live"
    for folder in (stale, live):
        folder.mkdir()
    os.utime(stale, (time.time() - 7200,) * 2)
    code, out, err = _run(capsys, "clear")
    assert (code, err) == (0, "")
    assert out == f"removed 3 entries ({total / 1e6:.1f} MB) from {cache_dir / 'gguf'}\n"
    assert sorted(p.name for p in (cache_dir / "gguf").iterdir()) == [live.name]  # key folders went too
    assert not a.parent.exists() and cache_folder.cache_entries() == []
    assert _run(capsys, "clear") == (0, f"removed 0 entries (0.0 kB) from {cache_dir / 'gguf'}\n", "")


def test_clear_older_than_keeps_what_was_used_recently(cache_dir, capsys):
    _entry(cache_dir, "old", "model", 1_000, used_days_ago=31)
    recent = _entry(cache_dir, "recent", "model", 1_000, used_days_ago=29)
    old_bytes = cache_folder.cache_entries()[0].n_bytes
    code, out, err = _run(capsys, "clear", "--older-than", "30")
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"removed 1 entry ({old_bytes / 1e3:.1f} kB) from {cache_dir / 'gguf'}",
                                "kept 1 used in the last 30 days"]
    assert [e.folder for e in cache_folder.cache_entries()] == [recent]


def test_clear_keeps_an_entry_a_process_is_reading(cache_dir, capsys):
    busy = _entry(cache_dir, "busy", "model", 1_000, used_days_ago=1)
    _entry(cache_dir, "idle", "model", 1_000, used_days_ago=1)
    with cache_folder.reading(busy) as found:
        assert found
        code, out, err = _run(capsys, "clear")
    assert (code, err) == (0, "")
    assert out.splitlines()[1] == ("kept 1 that a running process is reading: busy.gguf (model); run `lmloss cache "
                                   "clear` again once it is done")
    assert [e.folder for e in cache_folder.cache_entries()] == [busy]
    assert _run(capsys, "clear")[1].startswith("removed 1 entry") and cache_folder.cache_entries() == []


@pytest.mark.parametrize("argv, says", [
    (["clear", "--older-than", "-1"], "argument --older-than: expected a number of days >= 0 such as 30 or 0.5, "
                                      "got '-1'"),
    (["clear", "--older-than", "a week"], "got 'a week'"),
    (["clear", "--older-than", "inf"], "got 'inf'"),
    ([], "the following arguments are required"),
    (["purge"], "invalid choice: 'purge'"),
])
def test_a_bad_option_exits_2_and_says_what_was_expected(cache_dir, capsys, argv, says):
    _entry(cache_dir, "a", "model", 10, used_days_ago=100)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["cache", *argv])
    assert exit_.value.code == 2 and says in capsys.readouterr().err
    assert len(cache_folder.cache_entries()) == 1  # nothing was removed


def test_list_and_clear_after_a_real_conversion(cache_dir, tmp_path, capsys):
    from test_gguf_cache import write_tiny_gguf

    from lmloss.models import load_model

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    want = load_model(str(path), device="cpu", cache=False)
    load_model(str(path), device="cpu")
    code, out, _ = _run(capsys, "list")
    [row] = out.splitlines()[1:-1]
    assert code == 0 and row.split()[-2:] == ["model", "tiny.gguf"]
    assert row.startswith(time.strftime("%Y-%m-%d"))
    assert _run(capsys, "clear")[:2] == (0, f"removed 1 entry ({row.split()[2]} {row.split()[3]}) from "
                                            f"{cache_dir / 'gguf'}\n")
    assert list((cache_dir / "gguf").iterdir()) == []
    got = load_model(str(path), device="cpu")  # converted again
    assert all(torch.equal(got.module.state_dict()[k], v) for k, v in want.module.state_dict().items())


def test_python_m_lmloss_cache_runs_in_a_fresh_process(cache_dir):
    _entry(cache_dir, "a", "model", 10, used_days_ago=1)
    env = {**os.environ, "LMLOSS_CACHE_DIR": str(cache_dir)}
    out = subprocess.run([sys.executable, "-m", "lmloss", "cache", "list"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert "a.gguf" in out.stdout and out.stdout.splitlines()[-1].startswith("1 entry, ")


@pytest.mark.parametrize("action", ["list", "clear", "dir"])
def test_a_file_where_the_cache_folder_should_be_is_an_error(tmp_path, monkeypatch, capsys, action):
    (tmp_path / "not-a-folder").write_text("x")
    monkeypatch.setenv("LMLOSS_CACHE_DIR", str(tmp_path / "not-a-folder"))
    code, _out, err = _run(capsys, action)
    assert code == 2 and "is a file, expected a folder" in err
    assert (tmp_path / "not-a-folder").read_text() == "x"  # untouched
