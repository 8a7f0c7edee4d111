"""Atomic outputs: a result is either absent, the previous one, or complete.

Folders are built in a hidden temporary sibling and renamed into place when complete; single files
are written to a temporary sibling and ``os.replace``d. A crash at any moment leaves no partial
output that looks valid.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import GradPrunerError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _same_or_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def check_output(target: str | os.PathLike, overwrite: bool, inputs: tuple = ()) -> Path:
    """Validate an output location before any expensive work starts."""
    target = Path(target)
    for inp in inputs:
        if inp is not None and _same_or_inside(target, Path(inp)):
            raise GradPrunerError(
                f"Output {target} is (inside) the input {inp}; choose another --out, the input is never modified."
            )
    if target.exists() and not overwrite:
        raise GradPrunerError(f"Output {target} already exists; choose another path or pass --overwrite.")
    parent = target.resolve().parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise GradPrunerError(f"Cannot write to {parent}; choose a writable --out location.")
    return target


def _disk_error(target: Path, exc: OSError) -> GradPrunerError:
    if exc.errno == errno.ENOSPC:
        return GradPrunerError(f"The disk is full while writing {target}; free space and run again (nothing was written).")
    return GradPrunerError(f"Could not write {target}: {exc.strerror or exc}; check the location and run again.")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces ``target``; on any error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any mkdir
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise GradPrunerError(f"Output {target} appeared while writing; pass --overwrite to replace it.")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(target, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w"):
    """Yield a file object for a temporary sibling that is renamed to ``target`` when closed cleanly."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise _disk_error(target, exc) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(target: str | os.PathLike, obj) -> None:
    with atomic_file(target) as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


def read_json(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise GradPrunerError(f"{what} {path} does not exist; check the path.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise GradPrunerError(f"{what} {path} is not valid JSON ({exc}); regenerate it or fix the file.") from None
