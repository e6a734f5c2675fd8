"""Whole-or-absent writes: a failed write leaves the old file and no temporary, a killed one is cleaned up next time."""
import pytest

from facd_fast.atomic_files import atomic_write, remove_stale_temporaries


def test_a_failed_write_keeps_the_old_file_and_names_the_target(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")

    def disk_full(file):
        file.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device"):
        atomic_write(target, disk_full)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_the_next_write_removes_a_killed_writes_temporary_files(tmp_path):
    target = tmp_path / "last.pt"
    stale = [tmp_path / ".last.pt.abc123.tmp", tmp_path / ".last.pt.zz.tmp"]
    unrelated = [tmp_path / ".other.pt.abc.tmp", tmp_path / "last.pt.tmp"]
    for path in stale + unrelated:
        path.write_bytes(b"x")
    atomic_write(target, lambda file: file.write(b"new"))
    assert target.read_bytes() == b"new"
    assert not any(path.exists() for path in stale) and all(path.exists() for path in unrelated)
    assert remove_stale_temporaries(tmp_path / "missing" / "x.pt") == []
