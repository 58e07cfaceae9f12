"""Checksums and atomic writes: a crash never leaves a file or folder that looks complete."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import Blip2Error


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then rename.

    The file keeps the permissions of the one it replaces; a new file gets 0644 (``mkstemp`` makes it
    private, and bundle files are meant to be shared).
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself survives a power cut


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_directory(final: str | os.PathLike, *, force: bool = False):
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    On any exception (or SIGKILL) the temporary folder is removed or left under a hidden ``.tmp``
    name, never at ``final``. With ``force`` an existing ``final`` is replaced only after the new one
    is complete, by one atomic exchange of the two folders (Linux ``renameat2(RENAME_EXCHANGE)``), so
    ``final`` always holds either the old complete folder or the new one, even under SIGKILL. Where the
    exchange is not available, the old folder is moved aside to a hidden ``.old`` name first, which
    leaves a moment with no ``final``. Files are fsynced before the rename, so a power cut does not
    leave a renamed folder with empty files either.
    """
    final = Path(final)
    if final.exists() and not force:

        raise Blip2Error(f"output {final} already exists", hint="pass --force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be shared
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            if exchange_paths(tmp, final):  # tmp now holds the old folder
                fsync_dir(final.parent)
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = final.with_name(f".{final.name}.old.{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with ``RENAME_EXCHANGE``).

    Returns False, having changed nothing, where the platform or file system cannot do it.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (musl before 1.2.5, old glibc)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (renames, new files) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under ``root`` (before it is renamed into place)."""
    for folder, _, files in os.walk(os.fspath(root)):
        for name in files:
            try:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)
