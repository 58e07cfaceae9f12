"""The one place that turns a manifest's file names into files: a bundle is untrusted input.

A bundle may come from anyone (a model zoo, a vendor, a colleague), so every name it gives is checked
the same way, with or without checksum verification:

* a plain file name: no separators, no ``..``, no absolute or drive forms, no control characters;
* the file sits directly in the bundle's real path, is a regular file and not a symlink.

:meth:`BundleFiles.read` reads a file **once** into private memory, checks its size and sha256 on those
very bytes and returns them, so the bytes that were hashed are the bytes that are used (nothing is
opened again by path after the check, and nothing is a live memory map of a file others can write).
Each distinct file is hashed at most once per :class:`BundleFiles` by :meth:`verify`; sizes are capped
before anything is read.

:meth:`BundleFiles.stage` is the same one read for files too large to hold twice (a graph's weights): the
bytes are hashed as they are copied into a private folder (:class:`Staging`, mode 0700), the copy is
checked before anything uses it, and the backend opens the copy, never the bundle's file. Only this
process (and its own user) can write the copy, so a file swapped or rewritten in the bundle after the check
is never the one that runs, and the bundle's file is read exactly once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from runtime.errors import BundleError

# Names a manifest may not use for its files (the manifest itself is not a payload).
_RESERVED = {"", ".", "..", "manifest.json"}
MAX_NAME_CHARS = 255
READ_CHUNK = 1 << 24  # 16 MiB per read(): a hash interleaved with the reads, no second buffer


STAGING_ENV = "BLIP2_EXPORT_STAGING_DIR"  # where verified copies of large files go (default: the temp dir)


def check_name(name: object) -> str:
    """``name`` as a plain file name, or a :class:`BundleError` saying why it is not one."""
    if not isinstance(name, str):
        raise BundleError(f"manifest names a file with a {type(name).__name__}, not a string")
    shown = printable(name[:80])
    if name in _RESERVED or len(name) > MAX_NAME_CHARS:
        raise BundleError(f"manifest names {shown!r} as a bundle file: not a plain file name")
    if "/" in name or "\\" in name or ":" in name or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        raise BundleError(f"manifest names a file outside the bundle or not a plain file name: {shown!r}",
                          hint="a bundle file is named by its plain name, in the bundle's own folder")
    return name


def printable(text: str) -> str:
    """``text`` with C0/C1 control characters and DEL replaced by U+FFFD (safe to print on a terminal)."""
    return "".join("\ufffd" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in text)


class BundleFiles:
    """Resolve and read the files of one bundle folder; ``verify`` decides whether sha256 is checked."""

    def __init__(self, bundle: str | os.PathLike, *, verify: bool = True):
        self.bundle = Path(bundle)
        self.real = os.path.realpath(self.bundle)
        self.verify = verify
        self._hashed: dict[str, tuple[str, int]] = {}  # name -> (sha256, size) of files already checked

    def resolve(self, name: str, *, manifest: bool = False) -> Path:
        """The path of bundle file ``name``: a regular file (not a symlink) directly in the bundle's real path.

        ``manifest``: ``name`` is the manifest itself (a name records may not use)."""
        if not (manifest and name == "manifest.json"):
            check_name(name)
        path = os.path.join(self.real, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise BundleError(f"bundle file missing: {printable(name)}", hint="re-export the bundle") from None
        except OSError as e:
            raise BundleError(f"cannot read bundle file {printable(name)}: {e.strerror or e}") from None
        if stat.S_ISLNK(st.st_mode):
            raise BundleError(f"bundle file {printable(name)} is a symbolic link; bundle files must be regular "
                              "files inside the bundle", hint="copy the real file into the bundle")
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"bundle file {printable(name)} is not a regular file")
        if os.path.dirname(os.path.realpath(path)) != self.real:
            raise BundleError(f"bundle file {printable(name)} resolves outside the bundle")
        return Path(path)

    def _open(self, name: str, *, manifest: bool = False) -> int:
        """A read-only descriptor of bundle file ``name`` (resolved as :meth:`resolve` does; ``O_NOFOLLOW``,
        so a symlink swapped in after the check is refused)."""
        path = self.resolve(name, manifest=manifest)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(path, flags)
        except OSError as e:
            raise BundleError(f"cannot open bundle file {printable(name)}: {e.strerror or e}") from None

    def size(self, name: str) -> int:
        return self.resolve(name).stat().st_size

    def read(self, name: str, sha256: str | None, size: int | None = None, *, limit: int | None = None,
             what: str = "bundle file", as_bytes: bool = False) -> bytearray | bytes:
        """The bytes of ``name``, read once; with ``verify`` their size and sha256 are those of the manifest.

        ``limit`` caps the size before anything is read (a :class:`BundleError` names the cap). A private
        ``bytearray`` (numpy arrays can view it), or ``bytes`` with ``as_bytes``."""
        fd = self._open(name, manifest=what == "manifest")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"bundle file {printable(name)} is not a regular file")
            n = st.st_size
            if limit is not None and n > limit:
                raise BundleError(f"{what} {printable(name)} is {n} bytes, over the {limit}-byte limit for it",
                                  hint="this is not a file a blip2-export bundle holds")
            if self.verify and size is not None and n != size:
                raise BundleError(f"bundle file {printable(name)} has {n} bytes, the manifest says {size}: it was "
                                  "truncated or modified", hint="re-export the bundle")
            h = hashlib.sha256()
            with open(fd, "rb", buffering=0, closefd=False) as f:
                if as_bytes:  # one bytes object (what protobuf and ONNX Runtime take), no second copy
                    buf: bytes | bytearray = f.read(n)
                    while len(buf) < n and (more := f.read(n - len(buf))):
                        buf += more
                    got = len(buf)
                    h.update(buf)
                else:
                    buf = bytearray(n)
                    view = memoryview(buf)
                    got = 0
                    while got < n:
                        k = f.readinto(view[got:got + READ_CHUNK]) or 0
                        if k == 0:
                            break
                        h.update(view[got:got + k])
                        got += k
                    view.release()
                extra = f.read(1)
            if got != n or extra:
                raise BundleError(f"bundle file {printable(name)} changed size while it was read",
                                  hint="do not modify a bundle while it is loaded")
        finally:
            os.close(fd)
        if self.verify and sha256 is not None and h.hexdigest() != sha256:
            raise BundleError(f"bundle file {printable(name)} does not match its checksum: it was modified or "
                              "corrupted", hint="re-export the bundle")
        self._hashed[name] = (h.hexdigest(), n)
        return buf

    def stage(self, name: str, sha256: str | None, size: int | None, staging: Staging) -> Path:
        """Copy ``name`` into ``staging``, reading it once: its size and sha256 (with ``verify``) are those of
        the manifest, computed on the very bytes written. Returns the copy's path; it is complete and checked
        when this returns (a mismatch removes it and raises)."""
        fd = self._open(name)
        dest = staging.path(name)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"bundle file {printable(name)} is not a regular file")
            n = st.st_size
            if self.verify and size is not None and n != size:
                raise BundleError(f"bundle file {printable(name)} has {n} bytes, the manifest says {size}: it was "
                                  "truncated or modified", hint="re-export the bundle")
            staging.reserve(n, name)
            h = hashlib.sha256()
            buf = bytearray(READ_CHUNK)
            view = memoryview(buf)
            got = 0
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                with open(fd, "rb", buffering=0, closefd=False) as f:
                    while k := f.readinto(view):
                        h.update(view[:k])
                        written = 0
                        while written < k:
                            written += os.write(out, view[written:k])
                        got += k
            except OSError as e:
                raise BundleError(f"cannot copy bundle file {printable(name)} to {staging.root}: "
                                  f"{e.strerror or e}", hint=f"set {STAGING_ENV} to a folder with "
                                                             f"{n / 1e9:.1f} GB free") from None
            finally:
                os.close(out)
                view.release()
            if got != n:
                raise BundleError(f"bundle file {printable(name)} changed size while it was read",
                                  hint="do not modify a bundle while it is loaded")
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        if self.verify and sha256 is not None and h.hexdigest() != sha256:
            dest.unlink(missing_ok=True)
            raise BundleError(f"bundle file {printable(name)} does not match its checksum: it was modified or "
                              "corrupted", hint="re-export the bundle")
        self._hashed[name] = (h.hexdigest(), n)
        return dest

    def verify_all(self, files) -> None:
        """Check ``(name, sha256, size or None)`` records: each distinct name is resolved and hashed once;
        two records of one name must agree."""
        seen: dict[str, tuple[str, int | None]] = {}
        for name, digest, size in files:
            check_name(name)
            if name in seen:
                if seen[name][0] != digest or (size is not None and seen[name][1] not in (None, size)):
                    raise BundleError(f"manifest lists {printable(name)} twice with different checksums or sizes")
                continue
            seen[name] = (digest, size)
        for name, (digest, size) in seen.items():
            if not self.verify:
                self.resolve(name)
                continue
            if self._hashed.get(name, (None, None))[0] == digest:
                continue
            self._hash_file(name, digest, size)

    def _hash_file(self, name: str, digest: str, size: int | None) -> None:
        """Hash without keeping the bytes (:meth:`verify_all`: `inspect`, and what `build` reads)."""
        fd = self._open(name)
        try:
            n = os.fstat(fd).st_size
            if size is not None and n != size:
                raise BundleError(f"bundle file {printable(name)} has {n} bytes, the manifest says {size}: it was "
                                  "truncated or modified", hint="re-export the bundle")
            h = hashlib.sha256()
            while block := os.read(fd, 1 << 20):
                h.update(block)
        finally:
            os.close(fd)
        if h.hexdigest() != digest:
            raise BundleError(f"bundle file {printable(name)} does not match its checksum: it was modified or "
                              "corrupted", hint="re-export the bundle")
        self._hashed[name] = (digest, n)


class Staging:
    """A private folder (mode 0700, made with ``mkdtemp``) for verified copies of bundle files, removed on
    exit. ``root``: where to make it (default ``$BLIP2_EXPORT_STAGING_DIR``, else the system temp dir).

    The copies are needed only until the backend has read them (ONNX Runtime reads or maps a graph's data
    when its session is created); on POSIX a file still mapped stays valid after it is removed."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or os.environ.get(STAGING_ENV) or tempfile.gettempdir())
        self.dir: Path | None = None

    def __enter__(self) -> Staging:  # noqa: PYI034 - typing.Self needs Python 3.11; edge boxes run 3.10
        try:
            self.dir = Path(tempfile.mkdtemp(prefix="blip2-stage-", dir=self.root))
        except OSError as e:
            raise BundleError(f"cannot make a staging folder in {self.root}: {e.strerror or e}",
                              hint=f"set {STAGING_ENV} to a writable folder") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def path(self, name: str) -> Path:
        """Where the copy of ``name`` (a plain name, or ``folder/name`` for files of our own) goes."""
        assert self.dir is not None, "use Staging as a context manager"
        return self.dir / name

    def reserve(self, n: int, name: str) -> None:
        """Refuse, before copying, a file the staging folder's disk has no room for."""
        assert self.dir is not None
        free = shutil.disk_usage(self.dir).free
        if n > free:
            raise BundleError(f"no room to stage {printable(name)} ({n / 1e9:.2f} GB) in {self.root}: "
                              f"{free / 1e9:.2f} GB free", hint=f"set {STAGING_ENV} to a folder with more room")
