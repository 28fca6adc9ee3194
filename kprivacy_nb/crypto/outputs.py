"""Where the crypto commands write: :func:`kprivacy_nb.paths.atomic_write`, after saying plainly
what is in the way.

A dangling symbolic link at the output path is not "a file that exists", so the atomic write
would only trip over it when linking the finished file into place ("appeared while writing").
It is named for what it is before any work is done; with ``force`` the link itself is replaced
(its target is never written).

>>> with atomic_output("out.age") as f:  # doctest: +SKIP
...     f.write(b"...")
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import FileExistsRefusedError
from ..paths import atomic_write, check_target
from .printable import printable


def check_output(path: str | os.PathLike, *, force: bool = False) -> Path:
    """:func:`~kprivacy_nb.paths.check_target`, and a dangling symbolic link refused by name."""
    target = Path(path).expanduser()
    if not force and target.is_symlink() and not target.exists():
        raise FileExistsRefusedError(
            f"{printable(str(target))} is a symbolic link to "
            f"{printable(os.readlink(target))}, which does not exist; choose another path, or "
            "pass --force to replace the link itself (its target is not written)"
        )
    return check_target(target, force=force)


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike, *, force: bool = False, mode: int = 0o600
) -> Iterator[BinaryIO]:
    """:func:`~kprivacy_nb.paths.atomic_write` after :func:`check_output`."""
    check_output(path, force=force)
    with atomic_write(path, force=force, mode=mode) as f:
        yield f
