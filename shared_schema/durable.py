"""Atomic, verified directories on disk: what both sides use to keep what was trained.

A training state is a handful of files (safetensors, JSON, frames) that must be read back
either whole or not at all. A process may die at any instruction (SIGKILL, power loss), so
a directory is never written in place:

1. the files go into a fresh ``.tmp-<uuid>/`` beside the target, together with
   ``checksums.json`` (the sha256 of every other file); each file and each folder is
   fsynced;
2. the temporary folder is renamed to its final name (an atomic rename on one file
   system) and the parent folder is fsynced, so the rename itself is durable.

Replacing an existing directory (the device's ``latest/``) renames the old one aside to
``.old-<name>-<uuid>/`` first and removes it only after the new one is in place; a reader
that finds the name missing or corrupt falls back to that aside copy. On read every listed
file is hashed and compared; a mismatch, a missing file or an unreadable checksums.json
makes the directory *corrupt*: :func:`read_dir` raises :class:`CorruptState` and
:class:`Series` skips it with a warning. Nothing half-written is ever returned.

Two ways to use it::

    # one directory replaced in place (the device's latest/ and durable/)
    write_dir(state / "latest", {"slices.safetensors": blob, "progress.json": js})
    files = read_dir(state / "latest")          # {name: bytes}, verified

    # numbered checkpoints, the newest ``keep`` retained (the server's ckpt-<steps>/)
    series = Series(state, prefix="ckpt-", keep=2)
    series.save(120, files)
    for ckpt in series.valid():                  # newest first, corrupt ones skipped
        use(ckpt.number, ckpt.files); break

File names are relative POSIX paths (``store/abc-forward.frames`` makes the subfolder).
No framework imports: both the TensorFlow device and the torch server use this module.

Fault injection for tests: with the environment variable ``SPLITEASY_DURABLE_CRASH_AFTER=N``
the writing process calls ``os._exit(86)`` after the N-th file of a directory is written
(``N=0``: right after the temporary folder is created), i.e. in the middle of a write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ._exceptions import SpliteasyError

CHECKSUMS = "checksums.json"
CRASH_ENV = "SPLITEASY_DURABLE_CRASH_AFTER"
CRASH_EXIT_CODE = 86
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"

log = logging.getLogger("spliteasy.durable")

Files = Mapping[str, bytes | bytearray | memoryview]


class CorruptState(SpliteasyError):
    """A state directory is missing, torn (half-written) or does not match its checksums."""


# -- low level ------------------------------------------------------------------------


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safe_rel(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if (
        not name
        or rel.is_absolute()
        or any(p in ("", ".", "..") for p in rel.parts)
        or "\\" in name
        or str(rel) == CHECKSUMS
    ):
        raise ValueError(f"not a safe relative file name for a state directory: {name!r}")
    return rel


def _write_file(path: Path, data: bytes | bytearray | memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _crash_point(written: int) -> None:
    """Test hook: die here, as a SIGKILL would, when the environment asks for it."""
    at = os.environ.get(CRASH_ENV)
    if at is not None and at.strip().isdigit() and int(at) == written:
        os._exit(CRASH_EXIT_CODE)


def _fill(tmp: Path, files: Files) -> None:
    """Write ``files`` and checksums.json into the (new, empty) folder ``tmp``; fsync all."""
    sums: dict[str, str] = {}
    dirs = {tmp}
    _crash_point(0)
    for i, (name, data) in enumerate(sorted(files.items()), start=1):
        rel = _safe_rel(name)
        target = tmp.joinpath(*rel.parts)
        if target.parent != tmp:
            target.parent.mkdir(parents=True, exist_ok=True)
            d = target.parent
            while d != tmp:
                dirs.add(d)
                d = d.parent
        _write_file(target, data)
        sums[str(rel)] = sha256_hex(data)
        _crash_point(i)
    body = json.dumps({"algorithm": "sha256", "files": sums}, indent=1, sort_keys=True)
    _write_file(tmp / CHECKSUMS, body.encode())
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)


# -- one directory ----------------------------------------------------------------------


def write_dir(target: Path | str, files: Files, *, mode: int = 0o700) -> Path:
    """Create or atomically replace the directory ``target`` so that it holds exactly
    ``files`` (relative name -> bytes) plus ``checksums.json``.

    After a crash at any point, ``read_dir(target)`` returns either the old content or the
    new one, never a mixture. Files are created with mode 0600 (they may hold secrets:
    the device's session token), the folder with ``mode``.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir(mode=mode)
    try:
        _fill(tmp, files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    aside: Path | None = None
    if target.exists():
        aside = parent / f"{_OLD_PREFIX}{target.name}-{uuid.uuid4().hex}"
        os.rename(target, aside)
    os.rename(tmp, target)
    fsync_dir(parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    for old in parent.glob(f"{_OLD_PREFIX}{target.name}-*"):  # left by an earlier crash
        shutil.rmtree(old, ignore_errors=True)
    return target


def verify_dir(path: Path | str) -> dict[str, str]:
    """The checksums of a complete, intact directory (name -> sha256); else CorruptState."""
    path = Path(path)
    return _verified(path, read=False)[0]


def _verified(path: Path, read: bool) -> tuple[dict[str, str], dict[str, bytes]]:
    if not path.is_dir():
        raise CorruptState(f"{path}: no such state directory")
    try:
        doc = json.loads((path / CHECKSUMS).read_bytes())
        sums = doc["files"]
        if not isinstance(sums, dict) or doc.get("algorithm", "sha256") != "sha256":
            raise ValueError("unexpected checksums.json layout")
    except FileNotFoundError:
        raise CorruptState(f"{path}: no {CHECKSUMS} (torn write)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptState(f"{path}: unreadable {CHECKSUMS} ({exc})") from None
    files: dict[str, bytes] = {}
    for name, want in sums.items():
        try:
            rel = _safe_rel(name)
            data = path.joinpath(*rel.parts).read_bytes()
        except ValueError as exc:
            raise CorruptState(f"{path}: {exc}") from None
        except OSError as exc:
            raise CorruptState(f"{path}: {name} is missing or unreadable ({exc})") from None
        if sha256_hex(data) != want:
            raise CorruptState(f"{path}: {name} does not match its sha256 (corrupt)")
        if read:
            files[name] = data
    return sums, files


def read_dir(path: Path | str, *, fallback: bool = True) -> dict[str, bytes]:
    """Every file of a directory written by :func:`write_dir`, verified (name -> bytes).

    If ``path`` is missing or corrupt and a crash left the previous version aside
    (``.old-<name>-*``), that one is returned with a warning (``fallback=False``: never).
    Raises :class:`CorruptState` when nothing intact is found.
    """
    path = Path(path)
    try:
        return _verified(path, read=True)[1]
    except CorruptState as first:
        if not fallback:
            raise
        for old in sorted(path.parent.glob(f"{_OLD_PREFIX}{path.name}-*")):
            try:
                files = _verified(old, read=True)[1]
            except CorruptState:
                continue
            log.warning("%s; using the previous version left at %s", first, old)
            return files
        raise


# -- numbered series --------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One verified directory of a :class:`Series`."""

    number: int
    path: Path
    files: dict[str, bytes]


class Series:
    """Numbered directories ``<root>/<prefix><number:010d>/``; the newest ``keep`` are kept.

    ``save`` writes one atomically (replacing one with the same number) and prunes
    (directories ``valid`` found corrupt go first, so they never crowd out intact ones);
    ``valid`` yields the intact ones, newest first, and reports each torn or corrupt one
    it passes over through ``on_skip`` (default: a logged warning).
    """

    def __init__(
        self,
        root: Path | str,
        prefix: str = "ckpt-",
        keep: int = 2,
        on_skip: Callable[[Path, CorruptState], None] | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError("keep at least one directory")
        self.root = Path(root)
        self.prefix = prefix
        self.keep = keep
        self.on_skip = on_skip or _warn_skip
        self._name = re.compile(rf"^{re.escape(prefix)}(\d+)$")
        self._corrupt: set[int] = set()  # found corrupt by valid(): pruned first

    def path(self, number: int) -> Path:
        return self.root / f"{self.prefix}{number:010d}"

    def numbers(self) -> list[int]:
        """Numbers of the directories present (intact or not), newest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = self._name.match(p.name)
            if m and p.is_dir():
                found.append(int(m.group(1)))
        return sorted(found, reverse=True)

    def save(self, number: int, files: Files) -> Path:
        """Write directory ``number`` atomically, then remove all but the newest ``keep``."""
        if number < 0:
            raise ValueError("series numbers are non-negative")
        path = write_dir(self.path(number), files)
        self._corrupt.discard(number)  # replaced by an intact one
        self.prune()
        return path

    def prune(self) -> None:
        """Remove old directories beyond ``keep`` and temporary folders of dead writers."""
        for n in self._corrupt:
            shutil.rmtree(self.path(n), ignore_errors=True)
        self._corrupt.clear()
        for n in self.numbers()[self.keep :]:
            shutil.rmtree(self.path(n), ignore_errors=True)
        for tmp in self.root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def valid(self) -> Iterator[Entry]:
        """Intact directories, newest first, with their verified files.

        Temporary folders of a writer that died are reported through ``on_skip`` too
        (they are never candidates) and removed by the next :meth:`prune`.
        """
        if self.root.is_dir():
            for tmp in sorted(self.root.glob(f"{_TMP_PREFIX}*")):
                self.on_skip(tmp, CorruptState("half-written: its writer died before finishing"))
        for n in self.numbers():
            path = self.path(n)
            try:
                files = read_dir(path)
            except CorruptState as exc:
                self._corrupt.add(n)
                self.on_skip(path, exc)
                continue
            yield Entry(n, path, files)

    def newest(self) -> Entry | None:
        """The newest intact directory, or None."""
        return next(self.valid(), None)


def _warn_skip(path: Path, exc: CorruptState) -> None:
    log.warning("skipping %s: %s", path.name, exc)
