"""Where kprivacy_nb keeps its files, and how it writes them.

The home directory is ``$KPRIVACY_NB_HOME`` if set, else ``$XDG_CONFIG_HOME/kprivacy_nb``
(``~/.config/kprivacy_nb``). Every file the package writes goes through :func:`atomic_write`:
a temp file in the target folder, created 0600, fsynced, then renamed over the target.
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


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, *, force: bool = False, mode: int = 0o600
) -> Iterator[BinaryIO]:
    """Open a binary temp file next to ``path``; on success it atomically replaces ``path``.

    The temp file is created with ``mode`` (0600 by default) from the start, so its content is
    never readable by others. On any exception the temp file is removed and ``path`` is untouched.
    Without ``force`` an existing ``path`` is refused (checked before and again before renaming).

    >>> with atomic_write("out.bin") as f:  # doctest: +SKIP
    ...     f.write(b"data")
    """
    target = check_target(path, force=force)
    folder = target.parent if str(target.parent) else Path(".")
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
        with contextlib.suppress(OSError):
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, force: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically with mode 0600; return the path."""
    with atomic_write(path, force=force) as f:
        f.write(data)
    return Path(path)
