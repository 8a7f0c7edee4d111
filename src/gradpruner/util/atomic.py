"""Atomic outputs: a result is either absent, the previous one, or complete.

Folders are built in a hidden temporary sibling and renamed into place when complete (an existing
folder is swapped with the new one in one atomic step where the system allows it); single files
are written to a temporary sibling and ``os.replace``d. A crash, even ``kill -9``, at any moment
leaves no partial output that looks valid: at worst a hidden ``.NAME.tmp-PID-HOST-XXXX`` sibling,
which the next write of ``NAME`` removes once process PID of this host is gone.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from gradpruner.errors import GradPrunerError, disk_full

_STARTED = time.time()  # temporaries without an owner older than this are stale
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


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
    if "\0" in str(target):
        raise GradPrunerError(f"Output path {str(target)!r} contains a NUL byte; choose a plain --out path.")
    for inp in inputs:
        if inp is not None and _same_or_inside(target, Path(inp)):
            raise GradPrunerError(
                f"Output {target} is (inside) the input {inp}; choose another --out, the input is never modified."
            )
    if target.exists() and not overwrite:
        raise GradPrunerError(f"Output {target} already exists; choose another path or pass --overwrite.")
    parent = target.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GradPrunerError(f"Cannot create the folder {parent} ({exc.strerror or exc}); choose a writable --out location.") from None
    if not os.access(parent, os.W_OK):
        raise GradPrunerError(f"Cannot write to {parent}; choose a writable --out location.")
    clean_stale(target)
    return target


def _disk_error(target: Path, exc: BaseException) -> GradPrunerError:
    if disk_full(exc):
        return GradPrunerError(f"The disk is full while writing {target}; free space and run again (nothing was written).")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    return GradPrunerError(f"Could not write {target}: {reason}; check the location and run again.")


# --- stale temporaries -------------------------------------------------------------------------

def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{os.getpid()}-{_HOST}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(path: Path, name: str) -> str | None:
    """'tmp' or 'old' when ``path`` is a leftover of an atomic write of ``name`` whose writer is gone."""
    m = re.fullmatch(rf"\.{re.escape(name)}\.(tmp|old)-(\d+)-([0-9a-f]{{8}})(-[a-z0-9_]+)?", path.name)
    if m:
        pid = int(m.group(2))
        return m.group(1) if m.group(3) == _HOST and pid != os.getpid() and not _alive(pid) else None
    # Written by an earlier version: no owner in the name, so only ones older than this process.
    if re.fullmatch(rf"\.{re.escape(name)}\.(tmp-[a-z0-9_]{{8}}|old-\d+)", path.name):
        with contextlib.suppress(OSError):
            if path.lstat().st_mtime < _STARTED:
                return "old" if ".old-" in path.name else "tmp"
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporaries that killed writes of ``target`` left beside it; return them.

    Only names of our own pattern (``.NAME.tmp-…``, ``.NAME.old-…``) are touched, and only when the
    process that made them is gone. A previous output parked as ``.NAME.old-…`` by a write that
    died mid-swap is put back when ``target`` is missing, so the old state is never lost."""
    target = Path(target)
    found = []
    with contextlib.suppress(OSError), os.scandir(target.parent) as it:
        found = [Path(e.path) for e in it if e.name.startswith(f".{target.name}.")]
    removed = []
    for path in sorted(found):
        kind = _stale(path, target.name)
        if kind == "old" and not target.exists() and not target.is_symlink():
            with contextlib.suppress(OSError):
                os.replace(path, target)
                continue
        if kind is not None:
            _remove(path)
            removed.append(path)
    return removed


# --- atomic writes ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` RENAME_EXCHANGE).

    False where the system or file system cannot; the caller then falls back to two renames."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _put_in_place(tmp: Path, target: Path) -> None:
    """Move the complete ``tmp`` to ``target``, replacing what is there without a moment of absence
    where the system allows it."""
    if not (target.exists() or target.is_symlink()):
        os.replace(tmp, target)
    elif _exchange(tmp, target):
        _remove(tmp)  # now holds the previous output
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{_HOST}")
        os.replace(target, old)  # a crash here is undone by clean_stale on the next write
        os.replace(tmp, target)
        _remove(old)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces ``target``; on any error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any mkdir
    try:
        yield tmp
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise GradPrunerError(f"Output {target} appeared while writing; pass --overwrite to replace it.")
        _put_in_place(tmp, target)
    except GradPrunerError:
        _remove(tmp)
        raise
    except Exception as exc:
        _remove(tmp)
        if isinstance(exc, OSError) or disk_full(exc):
            raise _disk_error(target, exc) from exc
        raise
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w"):
    """Yield a file object for a temporary sibling that is renamed to ``target`` when closed cleanly."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except GradPrunerError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    except Exception as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) or disk_full(exc):
            raise _disk_error(target, exc) from exc
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield the path of an empty temporary sibling, for writers that open files by name (e.g. gguf's
    GGUFWriter); it is fsynced and renamed to ``target`` when the block ends cleanly, removed otherwise."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), dir=target.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, GradPrunerError) or not isinstance(exc, Exception):
            raise
        if isinstance(exc, OSError) or disk_full(exc):
            raise _disk_error(target, exc) from exc
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
