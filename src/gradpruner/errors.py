"""User-facing errors.

Every failure a user can cause (a bad path, a bad plan, a malformed data line) is raised as a
``GradPrunerError`` whose message is one sentence per problem, naming the input and what to do.
The CLI prints it without a traceback and exits with code 2.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class GradPrunerError(Exception):
    """An error in the user's input or environment, with a message meant to be read as is."""

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


def did_you_mean(name: str, known: Iterable[str], what: str) -> GradPrunerError:
    """An error for an unknown registry key, suggesting the closest known ones."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return GradPrunerError(f"Unknown {what} {name!r}; choose one of: {', '.join(known)}.{hint}")


def lookup(registry: dict, name: str, what: str):
    """``registry[name]`` or a did-you-mean error naming what was looked up."""
    try:
        return registry[name]
    except KeyError:
        raise did_you_mean(name, registry, what) from None


class Collect:
    """Run independent checks and report every problem they find in one ``GradPrunerError``.

    ::

        with Collect() as check:
            source = check(resolve_model, model)      # the result, or None if it failed
            examples = check(load_examples, data=data)
        # leaving the block raises GradPrunerError(*all problems) when there were any
    """

    def __init__(self):
        self.problems: list[str] = []

    def __call__(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GradPrunerError as exc:
            self.problems.extend(p for p in exc.problems if p not in self.problems)
            return None

    def __enter__(self) -> Collect:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is None and self.problems:
            raise GradPrunerError(*self.problems)
        return False


_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull", "FilesystemQuotaExceeded",
              "PytorchStreamWriter failed writing")  # torch.save on a full disk says only this


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) says the disk is full: ENOSPC/EDQUOT, also when a library
    wrapped the OS error in its own type (safetensors' Rust errors, torch's write failures)."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(exc) for t in _FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
