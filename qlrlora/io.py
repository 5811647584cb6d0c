"""Atomic writes: a crash or a kill mid-write leaves the previous file or directory, never half a new one.

A file is written to a temporary `.<name>.<random>.tmp` beside it, fsynced, renamed over the target,
and the directory is fsynced so the rename survives a power cut. A directory is filled the same way
as `.<name>.<random>.tmp/`; replacing an existing one goes through a backup `.<name>.old` for the
moment between the two renames, which `recover_interrupted_writes` puts back if a kill falls there.
`recover_interrupted_writes` also removes the temporaries that killed writes leave.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from qlrlora.errors import QLRError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and move the finished file onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
    try:
        write(Path(tmp))
        _fsync_file(Path(tmp))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def jsonl_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file (gzipped if it ends in .gz); a line
    that is not a JSON object, or bytes that are not UTF-8, are one-line errors naming the file and line."""
    import gzip

    path = Path(path)
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise QLRError(f"{path}: line {number}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise QLRError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
                yield number, row
        except UnicodeDecodeError as e:
            raise QLRError(f"{path}: not UTF-8 text (byte {e.start} of a line cannot be decoded)") from None


def atomic_directory(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Call `fill(tmp_dir)` and move the finished directory onto `path`, replacing what was there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backup = _backup_of(path)
    if backup.is_dir() and not path.exists():  # an earlier replacement was killed between its renames
        backup.rename(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the directory the permissions mkdir would
    try:
        fill(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        _fsync_dir(tmp)
        if path.exists():
            path.rename(backup)
            tmp.rename(path)
            _fsync_dir(path.parent)
            shutil.rmtree(backup)
        else:
            tmp.rename(path)
            _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_interrupted_writes(directory: str | Path) -> None:
    """Put back a directory whose replacement was interrupted between its two renames; remove temporaries."""
    directory = Path(directory)
    for entry in directory.iterdir():
        name = entry.name
        if name.startswith(".") and name.endswith(".old") and entry.is_dir():
            original = directory / name[1:-4]
            if original.exists():
                shutil.rmtree(entry)
            else:
                entry.rename(original)
        elif name.startswith(".") and name.endswith(".tmp"):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _backup_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
