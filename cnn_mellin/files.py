"""Durable atomic writes: a file is either its old content or its whole new content.

Every writer goes through a temporary file in the target's own folder (so the final
``os.replace`` is a rename within one file system), flushed and ``fsync``-ed before the
rename, then the folder is ``fsync``-ed where the platform allows it so that the rename
itself survives a crash. On any error the temporary file is removed and the target is
left as it was. Temporary files are named ``.<name>.<random>.tmp`` and get the permissions
a plain ``open(path, "w")`` would give (``0o666`` less the umask).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic"]


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty temporary file beside ``path``: its open descriptor and its path."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _fsync_dir(directory: Path) -> None:
    """fsync a folder so that a rename in it is durable; skipped where it cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. Windows: folders cannot be opened this way
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path``.

    For writers that need a file name (``torch.save``, ``safetensors``, ...): write the
    whole content to the yielded path inside the ``with`` block. The file exists (empty)
    when the block starts. On leaving the block normally it is fsync-ed and renamed over
    ``path``; on an exception it is removed and ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = _create_temp(path)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_atomic(path: str | os.PathLike, data: bytes | str, mode: str,
                  encoding: str | None = None) -> None:
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str | None = None) -> None:
    """Write ``text`` to ``path`` durably and atomically (see the module's docstring)."""
    _write_atomic(path, text, "w", encoding)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` durably and atomically (see the module's docstring)."""
    _write_atomic(path, data, "wb")
