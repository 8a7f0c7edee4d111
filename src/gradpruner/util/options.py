"""One definition of every stage setting: a dataclass field with its default and help.

The CLI flags are generated from the fields (``add_options``), the YAML sections are built from the
same classes (``pipeline.config``) and the Python API takes the class or its field names as keyword
arguments (``settings``), so a default is written exactly once.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import MISSING, field, fields


def opt(default, help: str, *, flag: str | None = None, run: bool = True, cli: bool = True, **argparse_kw):
    """A config field: ``default`` and ``help``; ``flag`` renames the CLI flag, ``run=False`` keeps the
    field out of the run config's YAML section (the run sets it), ``cli=False`` out of the CLI."""
    meta = {"help": help, "flag": flag, "run": run, "cli": cli, "argparse": argparse_kw}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def base_type(f: dataclasses.Field) -> type:
    """``int | None`` -> int; works with the string annotations of ``from __future__ import annotations``."""
    kind = f.type
    if isinstance(kind, str):
        names = [k.strip() for k in kind.split("|") if k.strip() != "None"]
        return {"int": int, "float": float, "str": str, "bool": bool}.get(names[0], str) if len(names) == 1 else str
    args = [a for a in typing.get_args(kind) if a is not type(None)] if isinstance(kind, types.UnionType) else [kind]
    return args[0] if len(args) == 1 and isinstance(args[0], type) else str


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def cli_fields(cls) -> list[dataclasses.Field]:
    return [f for f in fields(cls) if f.metadata.get("cli", True)]


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, skip: tuple[str, ...] = (),
                typed_only: bool = False) -> None:
    """One flag per field of ``cls`` (except ``skip``), its default and help taken from the field.
    ``typed_only``: a flag not typed is left out of the parsed namespace (the help still shows the default)."""
    for f in cli_fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        shown = "" if default is None else f" (default {default})"
        kw = dict(f.metadata.get("argparse") or {})
        typ = base_type(f)
        if typ is bool:
            kw.setdefault("action", argparse.BooleanOptionalAction)
        else:
            kw.setdefault("type", typ)
        parser.add_argument(flag_name(f), dest=f.name, default=argparse.SUPPRESS if typed_only else default,
                            help=f.metadata.get("help", "") + shown, **kw)


def from_args(cls, args: argparse.Namespace, **extra):
    """The config of ``cls`` that the parsed flags describe."""
    values = {f.name: getattr(args, f.name) for f in cli_fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **extra})


def settings(cls, config=None, given: dict | None = None, where: str = "setting"):
    """``config`` (or the defaults) with the keyword ``given`` applied: the Python API's two ways in.

    An unknown name is one error that lists the close ones."""
    from gradpruner.errors import GradPrunerError

    given = dict(given or {})
    known = {f.name for f in fields(cls)}
    unknown = [k for k in given if k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, known, n=2)
            hints.append(f"{k!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
        raise GradPrunerError(f"Unknown {where} {', '.join(hints)}; valid names are the fields of "
                              f"{cls.__name__}: {', '.join(sorted(known))}.")
    if config is not None and not isinstance(config, cls):
        raise GradPrunerError(f"config must be a {cls.__name__}, not a {type(config).__name__}.")
    return dataclasses.replace(config if config is not None else cls(), **given)


def defaults(cls) -> dict:
    """Field name -> default value."""
    return {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(cls)}
