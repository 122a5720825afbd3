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

__all__ = ["atomic_write"]

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
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
