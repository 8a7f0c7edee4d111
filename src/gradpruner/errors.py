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
