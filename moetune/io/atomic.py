"""Files and directories that appear whole or not at all, with the permissions the umask asks for.

A reader never sees a half-written file: `atomic_write` writes beside the target, fsyncs, and renames
over it. A directory written by `publish_dir` is filled under a temporary name beside its destination
and renamed into place; an old one is moved aside first and removed after. Every file gets
`0666 & ~umask` (safetensors and tempfile create 0600 files, which a server running as another user
could not read).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any


def umask_mode(mode: int) -> int:
    """`mode` less the process umask: what open() and mkdir() would give."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable."""
    with contextlib.suppress(OSError):  # not every platform can open or fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write via `write(tmp)` to a temporary file beside `path`, fsync it, rename it over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode(0o666))  # after write: some writers (safetensors) replace the file
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of UTF-8 text."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def publish_dir(dst: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Fill a new directory with `write(directory)` and put it at `dst` whole. Files `write` leaves
    get the umask's permissions. An existing `dst` is replaced: moved aside, then removed."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise NotADirectoryError(f"{dst}: exists and is not a directory")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, umask_mode(0o777))
        write(tmp)
        for directory, subdirs, files in os.walk(tmp):
            for name in subdirs:
                os.chmod(os.path.join(directory, name), umask_mode(0o777))
            for name in files:
                path = os.path.join(directory, name)
                os.chmod(path, umask_mode(0o666))
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(directory)
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: str, dst: str) -> None:
    """Rename the finished `tmp` to `dst`; an old non-empty `dst` is moved aside, then removed."""
    old = None
    if os.path.isdir(dst) and os.listdir(dst):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
        os.replace(dst, old)  # onto the empty directory just made
    os.replace(tmp, dst)
    fsync_dir(os.path.dirname(dst))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json_object(
    path: str | os.PathLike, error: type[Exception] = ValueError, missing: str = ""
) -> dict[str, Any]:
    """The JSON object in file `path`. FileNotFoundError (with the `missing` hint) when there is none;
    `error`, naming the file, for invalid JSON or another JSON value."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file{missing}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (ValueError, RecursionError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
