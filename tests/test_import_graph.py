"""The package's import graph, read from the source with ``ast`` (nothing is imported).

- evaluation/, app/ and hub/ never import ``hf_sam_peft.training`` (module-level or inside functions): they
  share SAM's forward with training through ``hf_sam_peft.sam_forward``, which sits beneath both.
- ``hf_sam_peft.sam_forward`` imports neither training nor evaluation.
- The module-level import graph of the package has no cycle.
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


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """``(imported package module, at module level)`` for every import statement in ``path``.

    ``from a import b`` imports ``a.b`` when that is a module, else ``a``. Importing ``a.b.c`` also runs the
    ``__init__`` of ``a.b`` (and ``a``): those packages count as imported too, except the importer's own
    ancestors (already being imported when it runs).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    top_level = {id(node) for node in tree.body}
    # statements inside `if`/`try` at module level still run on import
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    own_ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    found = []
    for node in ast.walk(tree):
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


def test_no_module_level_import_cycle():
    top, _ = import_graph()
    cycle = find_cycle(top)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])


def test_the_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_importing_evaluation_app_and_hub_loads_no_training_module():
    """The same at run time, transitively: a fresh interpreter imports them without hf_sam_peft.training."""
    code = (
        "import sys\n"
        "import hf_sam_peft.evaluation, hf_sam_peft.app, hf_sam_peft.hub, hf_sam_peft.sam_forward\n"
        "print(sorted(m for m in sys.modules if m.startswith('hf_sam_peft.training')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
