"""The lock of one run: an exclusive, non-waiting file lock on ``NAME.lock``.

The lock is an exclusive ``flock`` on ``NAME.lock`` (``msvcrt.locking`` on Windows), taken
without waiting: a second process gets :class:`~uap.runs.errors.RunLocked` naming the folder
and the holder's pid. The operating system drops the lock when its holder exits, however it
exits, so a crashed process never blocks a folder. The lock file holds the holder's pid and is
removed on release (one left by a crashed process is stale and harmless).
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from uap.runs.errors import RunLocked

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

__all__ = ["RunLock"]


class RunLock:
    """The lock of the run ``name`` in ``folder`` (re-entrant on this object)."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.path = folder / f"{name}.lock"
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock for the ``with`` block (creating the folder).

        Raises :class:`RunLocked` at once if another process holds it, and ``ValueError`` if
        the folder cannot be created (e.g. a parent is a file). The lock file is removed on
        release, and the folder too if this call created it and it is still empty.
        """
        if self._fd is not None:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        created = self._make_folder()
        try:
            fd = self._acquire()
            self._fd = fd
            try:
                yield
            finally:
                self._fd = None
                self._release(fd)
        finally:
            if created:
                with contextlib.suppress(OSError):
                    self.folder.rmdir()  # only if nothing was written in it

    def _make_folder(self) -> bool:
        """Create the folder if needed; True if it did not exist."""
        if self.folder.is_dir():
            return False
        try:
            self.folder.mkdir(parents=True)
        except FileExistsError:
            if self.folder.is_dir():  # another process created it meanwhile
                return False
            raise ValueError(f"cannot use {self.folder} as a run folder: it is a file") from None
        except OSError as e:
            raise ValueError(f"cannot use {self.folder} as a run folder: {e.strerror or e}") from None
        return True

    def _acquire(self) -> int:
        """Open and lock ``NAME.lock`` (not waiting), then write this process's pid into it."""
        path = self.path
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise ValueError(f"cannot use {self.folder} as a run folder: {e.strerror or e}") from None
            try:
                locked = _try_lock(fd)
            except OSError as e:
                os.close(fd)
                raise ValueError(f"cannot lock {path}: {e.strerror or e}") from None
            if not locked:
                pid = _read_pid(fd)
                os.close(fd)
                holder = f"pid {pid}" if pid is not None else "pid unknown"
                raise RunLocked(f"{self.folder} is in use: another process ({holder}) is writing the run "
                                f"{self.name!r} there; wait for it to finish or choose another folder", pid)
            if _is_same_file(fd, path):
                break
            os.close(fd)  # the previous holder removed this file after we opened it: lock the new one
        # The pid is written in place, not through atomic_write: replacing the file would
        # give it a new inode, which other processes would lock independently of this one.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._remove_stale_temporaries()
        return fd

    def _remove_stale_temporaries(self) -> None:
        """Remove temporary files of this run's writes left by a killed writer (``kill -9`` inside
        :func:`~uap.atomic.atomic_write`); with the lock held no live writer owns one."""
        for tmp in self.folder.glob(f".{self.name}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _release(self, fd: int) -> None:
        try:
            if os.name == "nt":  # an open file cannot be removed there
                os.ftruncate(fd, 0)
            else:  # removed while still locked, so a process that opened it sees it is stale
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        finally:
            os.close(fd)  # releases the lock


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False if another holder has it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True
    os.lseek(fd, 1 << 20, os.SEEK_SET)  # lock a byte past the pid, so others can still read it
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return True


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _is_same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)
