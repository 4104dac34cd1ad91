"""Crash-safe writing: whole files only, no temporaries left by a killed writer, permissions from the umask."""
import os
import stat

import pytest

from elsa.io import atomic_write, atomic_write_text


def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "last.pth"
    stale = [tmp_path / ".last.pth.k1l2ed.tmp", tmp_path / ".last.pth.x9y8z7.tmp"]
    for s in stale:
        s.write_bytes(b"\0" * 1024)  # what a SIGKILL during a checkpoint write leaves
    other = tmp_path / ".best.pth.abc.tmp"  # another file's temporary is not this write's business
    other.write_bytes(b"x")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert not any(s.exists() for s in stale) and other.exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umasks_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_text("old")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
