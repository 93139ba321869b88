"""The house: lower floors never import higher ones (also not inside functions), and no import cycles.

geometry -> data -> simulator -> models/diffusion/preprocess -> loading (calofm.hub) -> training, adaptation,
generation, evaluation -> command line (calofm.cli, calofm.commands)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "calofm"
FLOORS = [  # (floor, module prefixes), bottom to top
    (0, ("calofm.config", "calofm.materials", "calofm.geometry", "calofm.cards", "calofm.autoregister")),
    (1, ("calofm.data",)),
    (2, ("calofm.sim",)),
    (3, ("calofm.models", "calofm.diffusion", "calofm.preprocess", "calofm.profile", "calofm.ema", "calofm.sampling")),
    (4, ("calofm.hub",)),
    # sharing sits with evaluation: model cards quote evaluation results and training records
    (5, ("calofm.training", "calofm.adapt", "calofm.distill", "calofm.export", "calofm.generate", "calofm.evaluation",
         "calofm.hub.modelcard", "calofm.hub.push", "calofm.hub.datasets")),
    (6, ("calofm.cli", "calofm.commands")),
]


def floor_of(module: str) -> int | None:
    """The floor of the longest matching prefix (calofm.hub.push is not calofm.hub's floor)."""
    matches = [(len(p), floor) for floor, prefixes in FLOORS for p in prefixes
               if module == p or module.startswith(p + ".")]
    return max(matches)[1] if matches else None


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, name: str) -> set[str]:
    """Every calofm module ``path`` imports, at the top or inside functions."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: up node.level - 1 packages from this one
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    known = modules()
    return {m for m in found if m in known and m != name}


def test_lower_floors_never_import_higher_ones():
    bad = []
    for name, path in modules().items():
        mine = floor_of(name)
        if mine is None:
            continue
        for dep in imports(path, name):
            theirs = floor_of(dep)
            if theirs is not None and theirs > mine:
                bad.append(f"{name} (floor {mine}) imports {dep} (floor {theirs})")
    assert not bad, "\n".join(bad)


def test_every_module_has_a_floor():
    assert [n for n in modules() if n != "calofm" and floor_of(n) is None] == []


def test_no_import_cycles():
    graph = {n: imports(p, n) for n, p in modules().items()}
    # a package's __init__ importing its own submodules is not a cycle of the house
    graph = {n: {d for d in deps if not d.startswith(n + ".")} for n, deps in graph.items()}
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            visit(dep)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("floor", [0, 1, 2, 3, 4, 5])
def test_library_floors_do_not_parse_arguments(floor):
    """argparse lives with the commands."""
    users = [n for n, p in modules().items() if floor_of(n) == floor and "import argparse" in p.read_text()]
    assert users == []
