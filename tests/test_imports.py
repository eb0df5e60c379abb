"""The import rule of featx, read from the source with ``ast`` (docs/architecture.md explains it).

Imports run one way: foundations, then images / backbones / store, the loop, the engines, the
workflows, the CLI. A module imports only modules of its own layer or of the layers below, never
in a cycle, and never a private name (``_x``) of another module: a name another module needs is
promoted (made public) or moved.
"""

from __future__ import annotations

import ast
import pathlib
import textwrap

import pytest

import featx

PACKAGE = pathlib.Path(featx.__file__).parent

#: Layer of every module, by dotted prefix (the longest prefix wins). A new module needs a line here.
LAYERS = {
    # foundations: no featx module below them but each other
    "featx": 0,
    "featx.exceptions": 0,
    "featx.options": 0,
    "featx.paths": 0,
    "featx.progress": 0,
    "featx.threads": 0,
    # building blocks: what an image is, what a backbone is, where features are kept
    "featx.preprocess": 1,
    "featx.pooling": 1,
    "featx.featuresets": 1,
    "featx.devices": 1,
    "featx.images": 1,
    "featx.store": 1,
    "featx.shards": 1,
    "featx.backbones": 1,
    "featx.html": 1,
    # the loop and the runtimes it runs the network with
    "featx.runners": 2,
    "featx.runtimes": 2,
    "featx.decoding": 2,
    "featx.loop": 2,
    # the engines that run the loop elsewhere
    "featx.distributed": 3,
    # orchestration and workflows
    "featx.extraction": 4,
    "featx.transformers": 5,
    "featx.heads": 5,
    "featx.selection": 5,
    "featx.compare": 5,
    "featx.models": 5,
    "featx.finetuning": 5,
    "featx.auto": 5,
    "featx.advise": 5,
    "featx.bench": 5,
    "featx.report": 5,
    "featx.audit": 5,
    # the command line
    "featx.cli": 6,
    "featx.__main__": 6,
}


def _module_names(root: pathlib.Path) -> dict[str, pathlib.Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks: those imports never run."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph(root: pathlib.Path = PACKAGE):
    """``(edges, private)``: module -> featx modules it imports (anywhere in it, functions included),
    and ``(module, line, text)`` for every private name taken from another module."""
    modules = _module_names(root)
    edges: dict[str, set[str]] = {}
    private: list[tuple[str, int, str]] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_lines(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "featx":
                        targets.add(alias.name)
                        aliases[alias.asname or alias.name] = alias.name
                continue
            if node.level:  # relative import: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source.split(".")[0] != "featx":
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    targets.add(submodule)
                    aliases[alias.asname or alias.name] = submodule
                    continue
                targets.add(source)
                if alias.name.startswith("_") and not alias.name.startswith("__") and source != name:
                    private.append((name, node.lineno, f"from {source} import {alias.name}"))
        for node in ast.walk(tree):  # module._private on an imported featx module
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != name):
                private.append((name, node.lineno, f"{node.value.id}.{node.attr}"))
        targets.discard(name)
        edges[name] = {t for t in targets if t in modules}
    return edges, private


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    return None


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(edges.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                found.append(f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})")
    return found


def test_import_graph_every_module_has_a_layer():
    """Check that every featx module is placed in a layer of the import rule."""
    edges, _ = import_graph()
    missing = [m for m in edges if layer_of(m) is None]
    assert not missing, f"add these modules to LAYERS in tests/test_imports.py and docs/architecture.md: {missing}"


def test_import_graph_has_no_cycle():
    """Check that no featx modules import each other in a cycle (function-level imports included)."""
    edges, _ = import_graph()
    assert find_cycles(edges) == []


def test_import_graph_runs_one_way():
    """Check that no module imports a module of a higher layer."""
    edges, _ = import_graph()
    assert upward_imports(edges) == []


def test_import_graph_takes_no_private_name_across_modules():
    """Check that no featx module imports another module's private name."""
    _, private = import_graph()
    assert private == []


def _write_package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    package = root / "featx"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return package


def test_import_graph_catches_a_cycle_through_a_function_import(tmp_path):
    """Check that the rule sees a cycle hidden in a function-level import."""
    package = _write_package(tmp_path, {
        "__init__.py": "",
        "store.py": "from featx.images import open_source\n",
        "images.py": "def f():\n    from featx.store import FeatureStore\n",
    })
    edges, _ = import_graph(package)
    assert find_cycles(edges) == [["featx.images", "featx.store"]]


def test_import_graph_catches_private_and_upward_imports(tmp_path):
    """Check that the rule sees a private name taken from another module, and an import upward."""
    package = _write_package(tmp_path, {
        "__init__.py": "",
        "store.py": "from featx.compare import _reports_folder\nimport featx.images as im\nim._probe\n",
        "compare.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from featx.store import _x\n",
        "images.py": "",
    })
    edges, private = import_graph(package)
    assert [(m, text) for m, _, text in private] == [
        ("featx.store", "from featx.compare import _reports_folder"), ("featx.store", "im._probe")]
    assert upward_imports(edges) == ["featx.store (layer 1) imports featx.compare (layer 5)"]
    assert find_cycles(edges) == []


@pytest.mark.parametrize("module", ["featx.options", "featx.paths", "featx.exceptions"])
def test_foundations_import_no_heavy_package(module):
    """Check that the foundation modules import neither torch nor scikit-learn."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'sklearn'}}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
