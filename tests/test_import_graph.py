"""The package's import graph, read from the source with ``ast`` (nothing is imported).

- evaluation/, app/ and hub/ never import ``hf_sam_peft.training`` (module-level or inside functions): they
  share SAM's forward with training through ``hf_sam_peft.sam_forward``, which sits beneath both.
- ``hf_sam_peft.sam_forward`` imports neither training nor evaluation; ``hf_sam_peft.speed`` imports nothing above
  it (training, evaluation, hub, app, commands, study, the demo and train entry points).
- hub/ never imports evaluation/ or app/ (at any level): evaluation and the app load adapters through the
  hub's loader, so the one direction is evaluation/app -> hub.
- The module-level import graph of the package has no cycle of any length (every cycle is reported).
- Inside modeling/ (model classes and the checkpoint converters) no cycle either, function-level imports
  included; the converters' shared helpers import no converter and no converter imports the dispatcher.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import hf_sam_peft

PACKAGE = "hf_sam_peft"
ROOT = Path(hf_sam_peft.__file__).resolve().parent


def package_modules() -> dict[str, Path]:
    """Dotted name -> source file of every module of the package (packages by their ``__init__.py``)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _run_on_import(tree: ast.Module) -> set[int]:
    """ids of the import statements that run when the module is imported: everything outside function bodies
    (inside `if`, `try`, `with`, loops and class bodies included)."""
    found: set[int] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # runs when called, not on import (decorators and defaults aside: no imports there)
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.add(id(child))
            visit(child)

    visit(tree)
    return found


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import statements under `if TYPE_CHECKING:` (never run)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and (
            (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        ):
            found.update(id(n) for body in node.body for n in ast.walk(body) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return found


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """``(imported package module, at module level)`` for every import statement in ``path``.

    ``from a import b`` imports ``a.b`` when that is a module, else ``a``. Importing ``a.b.c`` also runs the
    ``__init__`` of ``a.b`` (and ``a``): those packages count as imported too, except the importer's own
    ancestors (already being imported when it runs). Imports under ``if TYPE_CHECKING:`` never run: skipped.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    top_level = _run_on_import(tree)
    type_checking = _type_checking_only(tree)
    own_ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            parts = target.split(".")
            chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            for name in chain:
                if name in modules and name != module and name not in own_ancestors:
                    found.append((name, id(node) in top_level))
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, all edges incl. function-level) between the package's modules."""
    modules = package_modules()
    top, every = {m: set() for m in modules}, {m: set() for m in modules}
    for module, path in modules.items():
        for target, at_top in imports_of(module, path, modules):
            every[module].add(target)
            if at_top:
                top[module].add(target)
    return top, every


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_graph_sees_the_package():
    """Sanity: the walker finds the modules and known edges (a silent, empty graph would pass everything)."""
    top, every = import_graph()
    assert {"hf_sam_peft.training.trainer", "hf_sam_peft.sam_forward.forward", "hf_sam_peft.hub.save"} <= set(top)
    assert "hf_sam_peft.sam_forward.forward" in top["hf_sam_peft.evaluation.predictor"]
    assert "hf_sam_peft.sam_forward" in top["hf_sam_peft.training.interactive"]  # the package's __init__ runs too
    assert "hf_sam_peft.training.trainer" in every["hf_sam_peft.train"]  # function-level imports are seen
    assert "hf_sam_peft.training.trainer" not in top["hf_sam_peft.train"]


def test_evaluation_app_and_hub_never_import_training():
    _, every = import_graph()
    offenders = {
        module: sorted(t for t in targets if _under(t, f"{PACKAGE}.training"))
        for module, targets in every.items()
        if _under(module, f"{PACKAGE}.evaluation", f"{PACKAGE}.app", f"{PACKAGE}.hub")
    }
    assert not {m: t for m, t in offenders.items() if t}, "import SAM's forward from hf_sam_peft.sam_forward"


def test_sam_forward_sits_beneath_training_and_evaluation():
    _, every = import_graph()
    above = (f"{PACKAGE}.training", f"{PACKAGE}.evaluation", f"{PACKAGE}.app", f"{PACKAGE}.hub")
    offenders = {
        module: sorted(t for t in targets if _under(t, *above))
        for module, targets in every.items()
        if _under(module, f"{PACKAGE}.sam_forward")
    }
    assert not {m: t for m, t in offenders.items() if t}


def test_speed_sits_beneath_training():
    """The speed options apply to a model and to a step's rounds; they never reach up into what uses them."""
    _, every = import_graph()
    above = tuple(f"{PACKAGE}.{name}" for name in (
        "training", "evaluation", "app", "hub", "commands", "study", "demo", "train", "cli"))
    offenders = {
        module: sorted(t for t in targets if _under(t, *above))
        for module, targets in every.items()
        if _under(module, f"{PACKAGE}.speed")
    }
    assert f"{PACKAGE}.speed.rounds" in every and not {m: t for m, t in offenders.items() if t}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (first == last) through every group of modules that import each other (each strongly
    connected component of more than one module, or a module importing itself), sorted: a cycle of any length
    is found, and every independent one is reported, not only the first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(find_cycle({m: graph[m] & group for m in group}) for group in groups)


def _report(found: list[list[str]]) -> str:
    return "; ".join(" -> ".join(cycle) for cycle in found)


def test_no_module_level_import_cycle():
    top, _ = import_graph()
    found = cycles(top)
    assert not found, "module-level import cycles: " + _report(found)


def test_no_import_cycle_inside_modeling_even_through_function_level_imports():
    """Model classes and checkpoint converters import each other one way only: deferring an import into a
    function is no way around a cycle."""
    _, every = import_graph()
    modeling = {m: {t for t in targets if _under(t, f"{PACKAGE}.modeling")}
                for m, targets in every.items() if _under(m, f"{PACKAGE}.modeling")}
    found = cycles(modeling)
    assert not found, "import cycles inside modeling/: " + _report(found)


def test_the_converters_import_downward_only():
    """convert_common <- convert_sam / convert_litemedsam / convert_sam2 <- convert (the dispatcher)."""
    _, every = import_graph()
    converters = [f"{PACKAGE}.modeling.{name}" for name in ("convert_sam", "convert_litemedsam", "convert_sam2")]
    common, dispatcher = f"{PACKAGE}.modeling.convert_common", f"{PACKAGE}.modeling.convert"
    assert set(converters) <= set(every) and common in every  # the modules exist
    assert not every[common] & {dispatcher, *converters}
    assert {m: sorted(every[m] & {dispatcher}) for m in converters} == {m: [] for m in converters}
    assert set(converters) <= every[dispatcher]


def test_hub_never_imports_evaluation_or_app():
    _, every = import_graph()
    offenders = {
        module: sorted(t for t in targets if _under(t, f"{PACKAGE}.evaluation", f"{PACKAGE}.app"))
        for module, targets in every.items()
        if _under(module, f"{PACKAGE}.hub")
    }
    assert not {m: t for m, t in offenders.items() if t}, "hub/ sits beneath evaluation/ and app/"


def test_the_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_cycle_of_any_length_is_reported():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": {"g"}, "h": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "d", "a"], ["e", "f", "e"], ["g", "g"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_what_runs_on_import_is_told_from_what_runs_when_called():
    tree = ast.parse(
        "import a\n"
        "if x:\n    import b\n"
        "with y:\n    import c\n"
        "class K:\n    import d\n    def m(self):\n        import e\n"
        "def f():\n    import g\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import h\n"
    )
    on_import = _run_on_import(tree)
    names = {n.names[0].name: id(n) in on_import for n in ast.walk(tree) if isinstance(n, ast.Import)}
    assert names == {"a": True, "b": True, "c": True, "d": True, "e": False, "g": False, "h": True}
    skipped = _type_checking_only(tree)
    assert {n.names[0].name for n in ast.walk(tree) if id(n) in skipped} == {"h"}


def test_importing_evaluation_app_and_hub_loads_no_training_module():
    """The same at run time, transitively: a fresh interpreter imports them without hf_sam_peft.training."""
    code = (
        "import sys\n"
        "import hf_sam_peft.evaluation, hf_sam_peft.app, hf_sam_peft.hub, hf_sam_peft.sam_forward\n"
        "print(sorted(m for m in sys.modules if m.startswith('hf_sam_peft.training')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
