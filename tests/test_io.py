import os

import pytest

from qlrlora.io import atomic_directory, atomic_write_text, recover_interrupted_writes


def test_a_failed_directory_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "export"
    atomic_directory(target, lambda tmp: (tmp / "a.txt").write_text("old"))

    def crash(tmp):
        (tmp / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_directory(target, crash)
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_kill_between_the_two_renames_is_put_back(tmp_path):
    target = tmp_path / "export"
    atomic_directory(target, lambda tmp: (tmp / "a.txt").write_text("old"))
    os.rename(target, tmp_path / ".export.old")  # what a kill after the first rename leaves
    (tmp_path / ".export.k3j2.tmp").mkdir()  # and the finished new directory it never moved
    recover_interrupted_writes(tmp_path)
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    os.rename(target, tmp_path / ".export.old")
    atomic_directory(target, lambda tmp: (tmp / "a.txt").write_text("new"))  # the next write recovers too
    assert (target / "a.txt").read_text() == "new" and not (tmp_path / ".export.old").exists()


def test_stray_temporary_files_are_removed_and_others_kept(tmp_path):
    atomic_write_text(tmp_path / "ranks.json", "{}")
    (tmp_path / ".ranks.png.x1.tmp").write_text("half")
    (tmp_path / ".hidden").write_text("a user's file")
    recover_interrupted_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "ranks.json"]
