"""Writing a file so that it is whole or absent: a temporary file beside it, fsync, then one rename.

A reader, or a run killed mid-write, never sees half a file: the target holds
its old content until the rename. A write killed before the rename leaves its
temporary file (``.<name>.<random>.tmp``) behind; the next write of the same
target removes it (:func:`remove_stale_temporaries`).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

TEMPORARY_SUFFIX = ".tmp"


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files a killed write of ``path`` left behind; returns them."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f".{path.name}.*{TEMPORARY_SUFFIX}"))
    for temporary in stale:
        temporary.unlink(missing_ok=True)
    return stale


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename it to ``path``.

    An OSError (a full disk, a read-only folder) is re-raised naming ``path``;
    the temporary file is removed on any failure.
    """
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):  # named by the target, never by the temporary file's name
            what = "it is a folder" if path.is_dir() else (error.strerror or str(error))
            raise type(error)(error.errno, f"cannot write {path}: {what}") from error
        raise
    return path


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
