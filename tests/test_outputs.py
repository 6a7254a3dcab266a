"""Result files: path checks before any work, and all-or-nothing writes with an ordinary file mode,
one file or several in a row."""
import os

import pytest

from lmloss.outputs import check_output_path, write_all, write_atomic


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


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_all_writes_in_order_with_the_target_suffix_and_mode(tmp_path):
    seen, announced = [], []

    def writer(data):
        def write(tmp):
            assert tmp.parent == tmp_path and tmp.exists() and tmp.read_bytes() == b""  # new, empty, beside it
            seen.append(tmp)
            tmp.write_bytes(data)
        return write

    old = os.umask(0o022)
    try:
        got = write_all([(tmp_path / "r.json", writer(b"{}")), (str(tmp_path / "p.PNG"), writer(b"png"))],
                        on_written=announced.append)
    finally:
        os.umask(old)
    assert got == announced == [str(tmp_path / "r.json"), str(tmp_path / "p.PNG")]
    assert [t.suffix for t in seen] == [".json", ".PNG"]  # writers that pick a format by suffix pick the target's
    assert (tmp_path / "r.json").read_bytes() == b"{}" and (tmp_path / "p.PNG").read_bytes() == b"png"
    assert (tmp_path / "p.PNG").stat().st_mode & 0o777 == 0o644
    assert _listing(tmp_path) == ["p.PNG", "r.json"]  # no temporary file left
    assert write_all([]) == []


@pytest.mark.parametrize("where", ["first", "midway"])
def test_write_all_failure_leaves_each_file_whole_or_as_it_was(tmp_path, where):
    """A writer that fails halfway through its file: that file and the ones after it keep their old
    bytes, the ones before are complete and listed, and no temporary file is left behind."""
    paths = [tmp_path / name for name in ("r.json", "t.npz", "p.png")]
    for p in paths:
        p.write_bytes(b"old " + p.name.encode())
    fail_at = 0 if where == "first" else 1

    def writer(k):
        def write(tmp):
            tmp.write_bytes(b"half of the new " + paths[k].name.encode())
            if k == fail_at:
                raise OSError(28, "No space left on device")
            tmp.write_bytes(b"new " + paths[k].name.encode())
        return write

    written, announced = [], []
    with pytest.raises((OSError, ValueError)) as exc:
        write_all([(p, writer(k)) for k, p in enumerate(paths)], written=written, on_written=announced.append)
    if where == "first":  # nothing written yet: the error as it came
        assert type(exc.value) is OSError and written == announced == []
    else:
        assert type(exc.value) is ValueError and isinstance(exc.value.__cause__, OSError)
        assert str(exc.value) == (f"OSError: [Errno 28] No space left on device (already written, complete: "
                                  f"{paths[0]})")
        assert written == announced == [str(paths[0])]
    for k, p in enumerate(paths):
        assert p.read_bytes() == (b"new " if k < fail_at else b"old ") + p.name.encode()
    assert _listing(tmp_path) == ["p.png", "r.json", "t.npz"]


def test_write_all_failure_on_rename_and_interrupt_leave_no_temporary_file(tmp_path, monkeypatch):
    replace = os.replace
    calls = []

    def second_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(ValueError, match=r"PermissionError: .*Permission denied \(already written, complete: .*a\.json\)"):
        write_all([(tmp_path / "a.json", lambda t: t.write_bytes(b"a")), (tmp_path / "b.png", lambda t: t.write_bytes(b"b"))])
    assert _listing(tmp_path) == ["a.json"]

    def interrupted(tmp):
        tmp.write_bytes(b"part")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):  # not turned into an error message, and still cleaned up
        write_all([(tmp_path / "c.json", lambda t: t.write_bytes(b"c")), (tmp_path / "d.png", interrupted)])
    assert _listing(tmp_path) == ["a.json", "c.json"]


def test_write_all_keeps_a_symlink_and_replaces_a_file_the_writer_renamed_over_tmp(tmp_path):
    real = tmp_path / "real.json"
    real.write_bytes(b"old")
    (tmp_path / "link.json").symlink_to(real)

    def replaces_tmp(tmp):  # as a library that writes its own temporary file and renames it does
        other = tmp.with_name("other")
        other.write_bytes(b"new")
        os.replace(other, tmp)

    write_all([(tmp_path / "link.json", replaces_tmp)])
    assert (tmp_path / "link.json").is_symlink() and real.read_bytes() == b"new"
    assert _listing(tmp_path) == ["link.json", "real.json"]
