"""Where kprivacy_nb keeps its files, and how it writes them.

The home directory is ``$KPRIVACY_NB_HOME`` if set, else ``$XDG_CONFIG_HOME/kprivacy_nb``
(``~/.config/kprivacy_nb``). Every file the package writes goes through :func:`atomic_write`:
an unnamed (Linux ``O_TMPFILE``) or hidden temp file in the target folder, created 0600,
fsynced, then put in place in one step.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import FileExistsRefusedError, OutputPathError


def home_dir(create: bool = True) -> Path:
    """Return the kprivacy_nb home directory (created 0700 when ``create``)."""
    env = os.environ.get("KPRIVACY_NB_HOME")
    if env:
        home = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        home = Path(xdg).expanduser() / "kprivacy_nb"
    if create:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return home


def check_target(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse, before any work is done, a write :func:`atomic_write` would refuse.

    An existing file without ``force``, a missing folder or one we can't write into.
    """
    target = Path(path).expanduser()
    if not force and target.exists():
        raise FileExistsRefusedError(f"{target} exists; pass --force (force=True) to overwrite it")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(f"folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise OutputPathError(f"folder {folder} is not writable")
    return target


def _open_unnamed(folder: Path, mode: int) -> int | None:
    """An unnamed file in ``folder`` (Linux ``O_TMPFILE``), or ``None`` where unsupported."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not Path("/proc/self/fd").is_dir():
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError:  # filesystem without O_TMPFILE support (EOPNOTSUPP, EISDIR on old kernels)
        return None


def _link_unnamed(fd: int, target: Path, folder: Path, *, force: bool) -> None:
    """Give the unnamed file ``fd`` the name ``target`` (only now does it appear on disk)."""
    proc = os.open("/proc/self/fd", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        # An explicit src_dir_fd makes os.link call linkat(..., AT_SYMLINK_FOLLOW), which links
        # the file behind the /proc magic link (plain link() would link the link itself).
        if not force:
            try:
                os.link(str(fd), target, src_dir_fd=proc, follow_symlinks=True)
            except FileExistsError:
                raise FileExistsRefusedError(
                    f"{target} appeared while writing; pass --force to overwrite"
                ) from None
            return
        for _ in range(100):
            tmp = folder / f".{target.name}.{os.urandom(6).hex()}.tmp"
            try:
                os.link(str(fd), tmp, src_dir_fd=proc, follow_symlinks=True)
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 100 random collisions
            raise OutputPathError(f"cannot create a temporary name in {folder}")
    finally:
        os.close(proc)
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, *, force: bool = False, mode: int = 0o600
) -> Iterator[BinaryIO]:
    """Open a binary temp file next to ``path``; on success it atomically replaces ``path``.

    On Linux the temp file is *unnamed* (``O_TMPFILE``) and linked into place only once it is
    complete, so a process killed mid-write (even by SIGKILL) leaves nothing behind. Elsewhere
    it is a hidden temp file, removed on any exception. Either way it is created with ``mode``
    (0600 by default), so its content is never readable by others, and on failure ``path`` is
    untouched. Without ``force`` an existing ``path`` is refused (checked before and again when
    the file is put in place).

    >>> with atomic_write("out.bin") as f:  # doctest: +SKIP
    ...     f.write(b"data")
    """
    target = check_target(path, force=force)
    folder = target.parent if str(target.parent) else Path(".")
    fd = _open_unnamed(folder, mode)
    if fd is not None:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            yield f
            f.flush()
            os.fsync(f.fileno())
            _link_unnamed(f.fileno(), target, folder, force=force)
        _fsync_folder(folder)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if not force and target.exists():
            raise FileExistsRefusedError(
                f"{target} appeared while writing; pass --force to overwrite"
            )
        os.replace(tmp, target)
        _fsync_folder(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, force: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically with mode 0600; return the path."""
    with atomic_write(path, force=force) as f:
        f.write(data)
    return Path(path)
