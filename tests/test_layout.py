"""The package's shape: tasks import the core, the core never imports a task, and no modules import in a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "xraygpt_app"
TASKS = ("cli", "web", "train", "explain")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """Every xraygpt_app module this file imports, at top level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # Imports under `if TYPE_CHECKING:` never run: annotations only, not an edge of the import graph.
    type_only = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                 for stmt in node.body for sub in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("xraygpt_app"):
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import x` names modules
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("xraygpt_app"))
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        # An import of a package's submodule runs the package's __init__ first: that is not an edge we draw.
        graph[name] = {target for target in _imports(path) if target in files and target != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    assert _cycle(_graph()) is None, f"import cycle: {' -> '.join(_cycle(_graph()))}"


def test_core_never_imports_a_task():
    graph = _graph()
    tasks = tuple(f"xraygpt_app.{task}" for task in TASKS)
    core = [name for name in graph if not name.startswith(tasks)]
    offenders = {name: sorted(t for t in graph[name] if t.startswith(tasks)) for name in core}
    assert not {name: targets for name, targets in offenders.items() if targets}


def test_task_packages_import_on_their_own():
    code = "import xraygpt_app.cli, xraygpt_app.web, xraygpt_app.cli.serve, xraygpt_app.web.ui"
    subprocess.run([sys.executable, "-c", code], check=True)


def _family_packages() -> list[str]:
    return sorted(p.name for p in (PACKAGE / "families").iterdir() if (p / "__init__.py").is_file())


def test_family_internals_stay_in_their_family():
    """Outside ``families/<name>/`` only the interface (``families``) and the registry are imported; a family's
    own training objective (``train/<name>_objective.py``) is the one module that may reach into it."""
    graph = _graph()
    offenders = {}
    for family in _family_packages():
        home = f"xraygpt_app.families.{family}"
        for name, targets in graph.items():
            if name == home or name.startswith(home + ".") or name == f"xraygpt_app.train.{family}_objective":
                continue
            reached = sorted(t for t in targets if t == home or t.startswith(home + "."))
            if reached:
                offenders[name] = reached
    assert not offenders, f"modules naming a family's internals: {offenders}"


def test_every_family_package_has_a_registry_entry():
    from xraygpt_app.families.registry import FAMILIES

    assert set(_family_packages()) == set(FAMILIES)
    for spec in FAMILIES.values():
        for field in ("model", "trainable", "image_memory", "train_memory"):
            assert callable(spec.load(field)), f"{spec.name}.{field} = {getattr(spec, field)} does not load"
