"""Atomic outputs: a file or folder appears whole under its final name or not at all (a temporary name in
the same folder, then one rename), with the permissions the user's umask gives any new file -- mkstemp
and mkdtemp alone would leave results private (0600 / 0700)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _share(path: str, is_dir: bool) -> None:
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def write_text(path: str, write: Callable[[IO[str]], None], *, fsync: bool = False) -> None:
    """Create or replace ``path`` with what ``write(f)`` writes to a text file ``f``."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        _share(tmp, is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj, *, indent: int | None = 1, fsync: bool = False) -> None:
    write_text(path, lambda f: json.dump(obj, f, indent=indent, default=float), fsync=fsync)


@contextmanager
def folder(path: str) -> Iterator[str]:
    """Yields a temporary folder beside ``path``; on success it replaces ``path`` (an existing one is
    removed only once the new one is complete), on failure it is removed and ``path`` is untouched."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        yield tmp
        # what was written inside may be private too (safetensors saves through its own temporary file)
        for root, dirs, files in os.walk(tmp):
            for name in dirs:
                _share(os.path.join(root, name), is_dir=True)
            for name in files:
                _share(os.path.join(root, name), is_dir=False)
        _share(tmp, is_dir=True)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def writable_folder(path: str, what: str = "--out") -> str:
    """Prove a file can be written in folder ``path`` before any work whose results would go there;
    raises ValueError in one line otherwise. Folders created for the proof are removed again when still
    empty, so a run that then fails on its input leaves nothing behind. Several processes may prove the
    same folder at once (torchrun ranks): one's clean-up can remove the folder under another's probe,
    which then simply tries again."""
    path_abs = os.path.abspath(path)
    top = path_abs  # the highest folder that does not exist yet
    while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
        top = os.path.dirname(top)
    created = not os.path.exists(top)
    for attempt in range(20):
        try:
            os.makedirs(path, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
            os.close(fd)
            os.unlink(probe)
            break
        except FileNotFoundError:
            if attempt == 19:
                raise ValueError(f"cannot write results to {what} {path!r}: it keeps disappearing") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            if isinstance(exc, FileExistsError | NotADirectoryError):
                reason = "a file of that name is in the way"
            raise ValueError(f"cannot write results to {what} {path!r}: {reason}") from None
    if created:
        # bottom up, and only folders nothing else has written into meanwhile
        d = path_abs
        while True:
            try:
                os.rmdir(d)
            except OSError:
                break
            if d == top:
                break
            d = os.path.dirname(d)
    return path
