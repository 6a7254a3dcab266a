"""Result files: path checks before any work, and all-or-nothing writes with an ordinary file mode."""
import os

import pytest

from lmloss.outputs import check_output_path, write_atomic


@pytest.mark.parametrize("value, match", [
    (".", "is a folder"),
    ("r.txt", "does not end in .json"),
    ("missing/r.json", "is not an existing folder; create it"),
    ("file/r.json", "is not an existing folder"),
])
def test_check_output_path_refuses(value, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=match):
        check_output_path("--output", value, suffixes=(".json",))


def test_check_output_path_refuses_a_device_and_an_unwritable_folder(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a regular file"):
        check_output_path("--output", "/dev/null")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root ignores chmod: tell the check
    with pytest.raises(ValueError, match="is not writable"):
        check_output_path("--output", tmp_path / "r.json")


def test_write_atomic_mode_and_failure(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    old = os.umask(0o027)
    try:
        write_atomic(target, b"new")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o640

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"newer")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_write_atomic_keeps_a_symlink(tmp_path):
    real = tmp_path / "real.json"
    real.write_bytes(b"old")
    (tmp_path / "link.json").symlink_to(real)
    write_atomic(tmp_path / "link.json", b"new")
    assert (tmp_path / "link.json").is_symlink() and real.read_bytes() == b"new"
