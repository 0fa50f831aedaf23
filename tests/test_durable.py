"""shared_schema.durable: atomic, verified state directories (no framework involved).

Crashes are real: a child process writes with ``SPLITEASY_DURABLE_CRASH_AFTER`` set and
dies (``os._exit``) in the middle of the write, as SIGKILL would.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shared_schema.durable import (
    CHECKSUMS,
    CRASH_ENV,
    CRASH_EXIT_CODE,
    CorruptState,
    Series,
    read_dir,
    verify_dir,
    write_dir,
)

REPO = Path(__file__).resolve().parents[1]
OLD = {"a.bin": b"\x00" * 1000, "sub/b.json": b'{"step": 1}'}
NEW = {"a.bin": b"\x01" * 1000, "sub/b.json": b'{"step": 2}', "c.txt": b"new"}


def _crash_writing(target: Path, files: dict[str, bytes], after: int) -> None:
    code = (
        "import sys; from shared_schema.durable import write_dir; "
        f"write_dir({str(target)!r}, {files!r}); print('not reached')"
    )
    env = {**os.environ, CRASH_ENV: str(after), "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert res.returncode == CRASH_EXIT_CODE, res.stderr
    assert b"not reached" not in res.stdout


def test_write_read_round_trip_with_checksums_and_private_files(tmp_path):
    d = write_dir(tmp_path / "snap", OLD)
    assert read_dir(d) == OLD
    sums = json.loads((d / CHECKSUMS).read_text())
    assert set(sums["files"]) == set(OLD) and sums["algorithm"] == "sha256"
    assert verify_dir(d) == sums["files"]
    for f in d.rglob("*"):
        if f.is_file():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


@pytest.mark.parametrize("name", ["", "/abs", "../up", "a/../b", "checksums.json", "a\\b"])
def test_unsafe_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError):
        write_dir(tmp_path / "snap", {name: b"x"})
    assert not (tmp_path / "snap").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("after", [0, 1, 2, 3])
def test_a_crash_while_replacing_keeps_the_old_content(tmp_path, after):
    target = write_dir(tmp_path / "latest", OLD)
    _crash_writing(target, NEW, after)
    assert read_dir(target) == OLD  # never a mixture
    write_dir(target, NEW)
    assert read_dir(target) == NEW


def test_a_crash_between_the_renames_falls_back_to_the_old_copy(tmp_path, caplog):
    target = write_dir(tmp_path / "latest", OLD)
    os.rename(
        target, tmp_path / ".old-latest-deadbeef"
    )  # the first rename happened, not the second
    with caplog.at_level(logging.WARNING, logger="spliteasy"):
        assert read_dir(target) == OLD
    assert "previous version" in caplog.text
    with pytest.raises(CorruptState):
        read_dir(target, fallback=False)
    write_dir(target, NEW)  # the next write cleans the leftover up
    assert read_dir(target) == NEW and not list(tmp_path.glob(".old-*"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "checksums", "no checksums"])
def test_corruption_is_detected(tmp_path, damage):
    d = write_dir(tmp_path / "snap", OLD)
    f = d / "sub" / "b.json"
    if damage == "flip":
        f.write_bytes(b'{"step": 9}')
    elif damage == "truncate":
        (d / "a.bin").write_bytes(b"\x00" * 999)
    elif damage == "delete":
        f.unlink()
    elif damage == "checksums":
        (d / CHECKSUMS).write_text("{not json")
    else:
        (d / CHECKSUMS).unlink()
    with pytest.raises(CorruptState):
        read_dir(d)
    with pytest.raises(CorruptState):
        verify_dir(d)


def test_series_keeps_the_newest_and_skips_torn_and_corrupt_ones(tmp_path, caplog):
    seen: list[str] = []
    series = Series(tmp_path, prefix="ckpt-", keep=2, on_skip=lambda p, e: seen.append(p.name))
    for n in (5, 10, 15):
        series.save(n, {"n": str(n).encode()})
    assert series.numbers() == [15, 10]
    assert series.path(15).name == "ckpt-0000000015"
    _crash_writing(series.path(20), {"n": b"20", "m": b"x"}, 1)  # torn: only a .tmp-*
    (series.path(15) / "n").write_bytes(b"99")  # corrupt
    newest = series.newest()
    assert newest is not None and newest.number == 10 and newest.files == {"n": b"10"}
    assert seen[0].startswith(".tmp-") and seen[1] == "ckpt-0000000015"
    # the corrupt one goes first when pruning, so it never crowds out an intact one
    series.save(20, {"n": b"20"})
    assert series.numbers() == [20, 10] and not list(tmp_path.glob(".tmp-*"))
    # replacing a number is atomic too
    series.save(20, {"n": b"20bis"})
    assert series.newest().files == {"n": b"20bis"}
    with caplog.at_level(logging.WARNING, logger="spliteasy"):
        assert [e.number for e in Series(tmp_path).valid()] == [20, 10]
