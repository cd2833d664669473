"""Output files: atomic writes with normal permissions, leftover temp-file cleanup, --out checks.

Every output of ``segment`` and ``evaluate`` goes through :func:`write_atomic`:
the data is written to a hidden temp file in the target folder and renamed
over the target, so a reader never sees a half-written file. The temp file is
created with mode 0666 minus the umask (what ``open()`` gives any other file),
not ``mkstemp``'s 0600, so results can be shared. A temp file name carries the
writer's process id and the ``.emerdiff-tmp`` suffix, so a later run can tell
leftovers of a killed writer (:func:`clean_stale_temps`) from files another
running process is still writing, and ``glob('*.png')`` never matches one.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".emerdiff-tmp"
_TEMP_RE = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")


def _temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"


def _create_temp(path: Path) -> Path:
    """Create an empty temp file next to ``path``; 0o666 lets the umask decide the mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    return tmp


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def write_atomic(path: Path, write: Callable[[str], Any]) -> None:
    """Call ``write(temp_path)``, then rename the temp file to ``path``: never a half-written output."""
    path = Path(path)
    check_output_file(path)  # a folder in the way: refused before writing, not after
    tmp = _create_temp(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsync'd temp file + ``os.replace``)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(Path(path), write)


class FileSet:
    """Several outputs that belong together, written all or nothing as far as a reader can tell.

    ``add`` writes each file to its temp file; ``commit`` first removes the old
    ``marker`` (so a set interrupted during the renames is recognisably
    incomplete), renames the others into place and the marker last. A set is
    complete exactly when its marker exists.
    """

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)
        self.staged: list[tuple[Path, Path]] = []

    def add(self, path: Path, write: Callable[[str], Any]) -> Path:
        """Stage ``path``: ``write(temp_path)`` runs now; the rename waits for :meth:`commit`."""
        path = Path(path)
        tmp = _create_temp(path)
        self.staged.append((tmp, path))
        try:
            write(str(tmp))
        except BaseException:
            self.abort()
            raise
        return path

    def commit(self) -> list[Path]:
        """Rename every staged file into place, the marker last; returns the final paths.

        Every target is checked before the first rename (a folder or other non-file where an output
        goes raises IsADirectoryError naming it, and nothing is renamed). Should a rename still fail
        mid-way (a full disk, a folder created meanwhile), the files this commit already renamed are
        removed again: the marker is gone, so they would be a partial set.
        """
        done: list[Path] = []
        try:
            for _, path in self.staged:
                check_output_file(path)
            _unlink_quietly(self.marker)
            ordered = sorted(self.staged, key=lambda item: item[1] == self.marker)
            for tmp, path in ordered:
                os.replace(tmp, path)
                done.append(path)
        except BaseException:
            for path in done:
                _unlink_quietly(path)
            self.abort()
            raise
        paths = [path for _, path in self.staged]
        self.staged = []
        return paths

    def abort(self) -> None:
        """Remove every temp file not yet renamed."""
        for tmp, _ in self.staged:
            _unlink_quietly(tmp)
        self.staged = []


def check_output_file(path: Path) -> None:
    """Refuse (IsADirectoryError naming ``path`` and the fix) a folder, or any other non-file, standing
    where an output file goes: renaming over it would fail after the earlier outputs were written."""
    path = Path(path)
    if path.is_dir() or (path.exists() and not path.is_file()):
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise IsADirectoryError(errno.EISDIR, f"{path} is {kind}, where an output file goes; remove or rename it, "
                                "or pass another --out", str(path))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process (or cannot tell): leave its file alone
    return True


def clean_stale_temps(folders: Sequence[Path]) -> list[Path]:
    """Delete our temp files in ``folders`` whose writing process is gone; returns what was removed.

    Only names made by :func:`write_atomic` are touched, and only those of
    processes that no longer run on this machine, so a concurrent writer into
    the same folder (e.g. another ``accelerate`` process) keeps its files.
    """
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = _TEMP_RE.match(p.name)
            if m and p.is_file() and not _pid_alive(int(m.group(1))):
                _unlink_quietly(p)
                removed.append(p)
    return removed


def check_output_dir(out: Path, option: str = "--out") -> None:
    """Fail early, writing nothing, if ``out`` cannot become a writable folder.

    Raises ValueError naming the path, the reason and the fix: ``out`` is a
    file, lies under a file, or the nearest existing folder is not writable.
    """
    out = Path(out).expanduser()
    probe = out
    while not probe.exists() and not probe.is_symlink():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == out else f"lies under {probe}, which is a file"
        raise ValueError(f"{option} {out} {where}; pass a folder path ({option} DIR)")
    if probe.is_symlink() and not probe.exists():
        raise ValueError(f"{option} {out}: {probe} is a broken symbolic link; remove it or pass another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {out}: folder {probe} is not writable; "
                         f"fix its permissions or pass a writable folder as {option}")


def unique_stems(items: Sequence[str | os.PathLike]) -> list[str]:
    """One distinct output name per input: the file stem, or ``stem-2``, ``stem-3`` ... for repeats.

    ``d1/x.png d2/x.png d2/x.jpg`` -> ``x, x-2, x-3``. A name that is itself
    some input's natural stem is never handed to a repeat, so no output set
    overwrites another's.
    """
    natural = [Path(item).stem for item in items]
    taken = set(natural)
    seen: set[str] = set()
    out = []
    for stem in natural:
        if stem not in seen:
            seen.add(stem)
            out.append(stem)
            continue
        n = 2
        while f"{stem}-{n}" in taken:
            n += 1
        name = f"{stem}-{n}"
        taken.add(name)
        out.append(name)
    return out
