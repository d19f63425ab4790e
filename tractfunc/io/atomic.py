"""Atomic file output: write to a temporary file in the destination's folder, rename it into place on success.

An interrupted or failed write (an exception, Ctrl-C, a full disk) then never leaves a partial file at the
destination and never destroys a file that was there before.  The temporary name keeps the destination's
extension (``.nii.gz``, ``.png``, ``.trx``: writers choose the format from it) and is hidden (``.name.~tmp-XXXX.ext``).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from ..errors import TractfuncError

_COMPOUND = (".nii.gz", ".mif.gz", ".tar.gz")


def extension(path: str) -> str:
    """The file's extension as writers read it: ``.nii.gz`` for ``a/b.nii.gz``, else the last suffix."""
    low = path.lower()
    for ext in _COMPOUND:
        if low.endswith(ext):
            return path[-len(ext):]
    return os.path.splitext(path)[1]


def temp_path(path: str) -> str:
    """A new, empty temporary file next to ``path`` (same folder, same extension); returns its path."""
    folder, name = os.path.split(os.path.abspath(path))
    ext = extension(name)
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + name[:len(name) - len(ext)] + ".~tmp-", suffix=ext, dir=folder)
    except OSError as e:
        raise TractfuncError(f"{path}: cannot write in {folder or '.'} ({e.strerror or e})") from None
    os.close(fd)
    return tmp


def remove_quietly(path: str) -> None:
    """Delete ``path`` if it exists (a file or a folder tree, e.g. a .trx directory), ignoring errors."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            import shutil
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path to write ``path``'s content to; on a normal exit it replaces ``path``
    (``os.replace``: atomic on one file system), on any exception (KeyboardInterrupt included) it is removed
    and ``path`` is left as it was.  OSError while writing becomes a one-line :class:`TractfuncError`."""
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        raise TractfuncError(f"{path}: cannot be written ({e.strerror or e})") from None
    except BaseException:
        remove_quietly(tmp)
        raise
