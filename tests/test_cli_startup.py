"""``gradpruner --help`` answers without the heavy libraries: building the parser imports no torch.

Checked by what is imported (in a fresh interpreter), never by wall time, so the check holds on a
loaded CI machine as on a laptop.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "transformers", "peft", "accelerate", "numpy", "matplotlib", "safetensors", "datasets")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8",  # the methods' help has Σ, ‖ and ⌈ in it
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, encoding="utf-8", env=env,
                          timeout=300)


def _commands() -> list[str]:
    from gradpruner.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


def test_building_the_parser_imports_nothing_heavy():
    code = ("import sys, gradpruner.cli; gradpruner.cli.build_parser(); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    res = _python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", f"building the CLI's parser imported {res.stdout.strip()}"


@pytest.mark.parametrize("argv", [[], *([c] for c in _commands())], ids=lambda a: " ".join(a) or "gradpruner")
def test_every_help_exits_0_without_heavy_imports(argv):
    code = ("import sys\nfrom gradpruner.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            f"    print(e.code, sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n")
    res = _python(code, *argv, "--help")
    assert res.stdout.startswith("usage: gradpruner"), res.stderr
    assert res.stderr.strip().splitlines()[-1] == "0 []", res.stderr


def test_score_help_lists_every_method():
    from gradpruner.scoring.catalog import CATALOG

    res = _python("import sys\nfrom gradpruner.cli import main\nmain(['score', '--help'])")
    assert res.returncode == 0, res.stderr
    assert all(f"  {name} " in res.stdout and info.about in res.stdout for name, info in CATALOG.items())
