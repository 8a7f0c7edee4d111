"""The package's shape, as docs/architecture.md describes it: imports go one way, down the layers.

Read from the source with ``ast`` (nothing is imported), so a violation names the file and line:
(a) no import goes up the layer order, or sideways into another subpackage of the same layer (the
stages may import each other only along ``STAGE_EDGES``); (b) no import circle between modules;
(c) no module imports another module's private (underscore) name; (d) docs/architecture.md lists
every module, and no module that is gone. Imports inside functions count like top-level ones.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "gradpruner"
DOC = ROOT / "docs" / "architecture.md"

# Bottom to top. A module may import its own subpackage (or, at the top level, itself) and any lower
# layer; "gradpruner" is the package's own __init__.py.
LAYERS = [
    {"errors"},
    {"util"},
    {"models", "data"},
    {"scoring", "planning", "pruning", "healing", "finetuning", "evaluation", "measure", "export"},  # the stages
    {"report"},
    {"api"},
    {"pipeline"},
    {"cli", "gradpruner"},
]
RANK = {group: i for i, groups in enumerate(LAYERS) for group in groups}
# Stage -> stage imports that follow the pipeline's one-way order (and no others):
# pruning reads the IGIA factors that scoring wrote (scoring.igia: igia_matrix, module_igia).
STAGE_EDGES = {("pruning", "scoring")}


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is named by its __init__.py)."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every gradpruner import in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "gradpruner"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "gradpruner":
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                out.append((full, None, node.lineno) if full in MODULES else (source, alias.name, node.lineno))
    return out


def _module_aliases(module: str) -> dict[str, str]:
    """Local names bound to gradpruner modules (``from gradpruner.models import experts``)."""
    out = {}
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    out[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES:
                    out[alias.asname] = alias.name
    return out


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if _group(m) not in RANK], "add the new subpackage to LAYERS (and the doc)"


def test_imports_go_down_the_layers():
    bad = []
    for module in MODULES:
        mine = _group(module)
        for target, _, line in _imports(module):
            if target not in MODULES:
                bad.append(f"{_where(module, line)} imports {target}, which does not exist")
                continue
            theirs = _group(target)
            if mine == theirs or RANK[mine] > RANK[theirs] or (mine, theirs) in STAGE_EDGES:
                continue
            how = "up" if RANK[mine] < RANK[theirs] else "sideways"
            bad.append(f"{_where(module, line)}: {module} ({mine}) imports {target} ({theirs}), {how} the layers")
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    graph = {m: sorted({t for t, _, _ in _imports(m) if t in MODULES and t != m}) for m in MODULES}
    # Tarjan's strongly connected components: any with two or more modules is a circle.
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_no_module_imports_another_modules_private_name():
    bad = []
    for module in MODULES:
        for target, name, line in _imports(module):
            if name is not None and _private(name) and target != module:
                bad.append(f"{_where(module, line)} imports {target}.{name}")
        aliases = _module_aliases(module)
        for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)):
                bad.append(f"{_where(module, node.lineno)} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "make the name public where it is shared, or keep it in its module:\n" + "\n".join(bad)


def _doc_name(module: str) -> str:
    """How docs/architecture.md names a module: `scoring/igia.py`, a package `scoring/`, `api.py`."""
    rel = MODULES[module].relative_to(SRC).as_posix()
    return rel.removesuffix("__init__.py") if rel.endswith("/__init__.py") else rel


def _doc_table() -> set[str]:
    """The modules docs/architecture.md's tables describe: their first column, ``| `scoring/igia.py` |``."""
    return set(re.findall(r"^\| `([^`]+)` \|", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE))


def test_architecture_doc_lists_every_module():
    missing = sorted(_doc_name(m) for m in MODULES if _doc_name(m) not in _doc_table())
    assert not missing, f"docs/architecture.md does not describe {missing}; add a line for each"


def test_architecture_doc_lists_no_missing_module():
    gone = sorted(_doc_table() - {_doc_name(m) for m in MODULES})
    assert not gone, f"docs/architecture.md describes modules that do not exist: {gone}"
