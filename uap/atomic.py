"""One way to write a file so that readers never see half of it.

Every artefact the toolkit writes (perturbations, reports, checkpoints, figures, caches)
goes through :func:`atomic_write`: the content goes to a temporary file in the target's
folder, which then replaces the target with ``os.replace`` (atomic on POSIX and Windows). A
crash leaves the old file or the new one, never a truncated one, and the temporary file is
removed on error.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

__all__ = ["atomic_write", "check_output_folder"]

Content = Union[bytes, str, Callable[[Path], None]]


def atomic_write(path: str | os.PathLike, content: Content) -> Path:
    """Write ``content`` to ``path`` atomically and return the path.

    ``content`` is bytes, text (written as UTF-8), or a function ``write(tmp_path)`` that
    writes the file itself (for libraries that only write to a path, e.g. safetensors'
    ``save_file`` or matplotlib's ``savefig``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        if callable(content):
            os.close(fd)
            content(tmp)
        else:
            data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        _pause_for_tests()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _pause_for_tests() -> None:
    """``UAP_TEST_WRITE_PAUSE=SECONDS`` holds every write with its temporary file complete but not
    yet renamed, so the crash tests can kill a process inside a write. Unset: nothing."""
    pause = os.environ.get("UAP_TEST_WRITE_PAUSE")
    if pause:
        import time

        time.sleep(float(pause))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Check, before any work, that ``path`` can be a folder this process writes into.

    ``path`` must be a writable folder, or not exist yet under a nearest existing ancestor that
    is a writable folder (so it can be created); nothing is created here. Raises ``ValueError``
    naming ``what`` and the reason: it is a file, it lies under a file, or a folder on the way
    is not writable. Commands call it first, so a bad ``--out`` costs nothing instead of a
    finished computation that cannot be saved.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot use {path} as {what}: it is a file, not a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"cannot use {path} as {what}: {probe} is a file, so it cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "it is" if probe == path else f"{probe} is"
        raise ValueError(f"cannot use {path} as {what}: {where} not writable by this user")
    return path
