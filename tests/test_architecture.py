"""The package's shape: imports run one way, lowest layer first, with no circles and no private reaches.

Read from the source files (every import, including those inside functions and under
``TYPE_CHECKING``), so a circle that only closes at run time in a rarely taken branch is
caught too.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import modules of its own layer and of the layers below it.
LAYERS = (
    ("alignscope._version", "alignscope.errors", "alignscope.columns", "alignscope.floors"),
    ("alignscope.report",),  # pandas / matplotlib only
    ("alignscope.runtime",),
    ("alignscope.model",),
    ("alignscope.geometry",),
    ("alignscope.inputs",),
    ("alignscope.measure",),
    ("alignscope.fit",),
    ("alignscope.engine",),
    ("alignscope.explain", "alignscope.bench", "alignscope.stn"),
    ("alignscope.cli", "alignscope.__main__"),
)
TORCH_FREE = ("alignscope._version", "alignscope.errors", "alignscope.columns", "alignscope.floors", "alignscope.report")


def _modules() -> dict[str, Path]:
    found = {}
    for base, prefix in ((ROOT / "alignscope", "alignscope"), (ROOT / "cli", "alignscope.cli")):
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            name = ".".join((prefix, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported alignscope module, imported names, line) for every import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            for sub in submodules:
                out.append((sub, [], node.lineno))
            if target in MODULES and len(submodules) < len(names):
                out.append((target, [n for n in names if f"{target}.{n}" not in MODULES], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name in MODULES]
    return out


def _layer(name: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS")


def _graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in _imports(name, path) if target != name} for name, path in MODULES.items()}


def test_every_module_has_a_layer_and_imports_only_downwards():
    wrong = []
    for name, path in MODULES.items():
        if name == "alignscope":  # the public face: lazy re-exports of every layer
            continue
        for target, _, line in _imports(name, path):
            if target == "alignscope" or target == name:
                continue
            if _layer(target) > _layer(name):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} (a higher layer)")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    graph = _graph()
    graph.pop("alignscope")  # its lazy table names every layer; nothing imports it back
    for name in graph:
        graph[name].discard("alignscope")
    # Tarjan's strongly connected components
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_no_module_imports_another_modules_private_name():
    reaches = []
    for name, path in MODULES.items():
        for target, names, line in _imports(name, path):
            if target == name:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                reaches.append(f"{path.relative_to(ROOT)}:{line} imports {', '.join(private)} from {target}")
    assert not reaches, "\n".join(reaches)


def test_the_report_side_never_imports_torch():
    static = []
    for name, path in MODULES.items():
        if not any(name == p or name.startswith(p + ".") for p in TORCH_FREE):
            continue
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                       for n in ast.walk(block)}  # annotations only: never run
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only:
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m == "torch" or m.startswith("torch.") or m == "timm" for m in modules):
                    static.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not static, static
    reader = [f"import {m}" for m in MODULES if any(m == p or m.startswith(p + ".") for p in TORCH_FREE)]
    code = "; ".join(reader) + "; import sys; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_every_package_folder_is_installed():
    """A non-editable install ships only the packages pyproject.toml lists: every folder with an __init__.py must be there."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(("alignscope", *p.parent.relative_to(ROOT / "alignscope").parts)).rstrip(".")
               for p in (ROOT / "alignscope").rglob("__init__.py")}
    folders |= {"alignscope.cli"} if (ROOT / "cli" / "__init__.py").exists() else set()
    assert folders <= listed, f"missing from [tool.setuptools] packages: {sorted(folders - listed)}"
