"""The shape of the house (/work/shared/ARCHITECTURE.md): no import circles, imports only go
down the layers, no file over about 500 lines.

Read from the source with ast, so nothing is imported: every ``import`` and ``from ... import``
statement of a fastdiff module counts, at module level and inside functions (a function-level
import hides a circle from the interpreter, not from the design). So do a package's lazy
names (PEP 562): the submodules its ``_EXPORTS`` table (name -> submodule) and ``_SUBMODULES``
tuple name, which its ``__getattr__`` imports on first use; they count as function-level.
"""
import ast
import os
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "fastdiff")
MAX_LINES = 500  # STYLE.md #12: past ~500 lines a file is a sign to split along the layer lines

# The layers, top to bottom: a module may import from its own layer and the layers below it.
# ARCHITECTURE.md names cli -> pipelines -> loaders -> guidance -> sampling -> models -> ops;
# the rest sit where what they import puts them:
# - "cli": the commands' parsers (fastdiff/cli.py, its shared argument checks, __main__, and
#   the sub-commands' parsers eval/cli.py and train/cli.py): thin, over everything below.
# - "apps": eval/, train/, export/, tools/ -- programs built on the API (they run, train, export
#   pipelines, or check them for a GPU), used only by the CLI and the tests.
# - "api": fastdiff/__init__.py, the public face that re-exports the pipelines and below;
#   apps may use it (train/export.py checks its folder through fastdiff.Pipeline).
# - "data": the procedural datasets, plain tensors with no other fastdiff import; at the
#   bottom, so any layer may read them and they depend on nothing.
# - "support": fastdiff/_lazy.py, the package faces' lazy names (standard library only), under all.
LAYERS = ("cli", "apps", "api", "pipelines", "loaders", "guidance", "sampling", "models", "ops", "data", "support")
SUPPORT_MODULES = {"fastdiff._lazy"}
CLI_MODULES = {"fastdiff.cli", "fastdiff.cli_args", "fastdiff.__main__", "fastdiff.eval.cli", "fastdiff.train.cli",
               "fastdiff.export.cli", "fastdiff.eval.sample_cli", "fastdiff.eval.metrics_cli"}
APPS = {"eval", "train", "export", "tools"}


def _modules() -> Dict[str, Tuple[str, bool]]:
    """Dotted name -> (file, is a package's __init__) for every .py file under fastdiff/."""
    found = {}
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                is_package = parts[-1] == "__init__"
                found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = _modules()


def _owner(name: str) -> Optional[str]:
    """The fastdiff module `name` lives in (fastdiff.ops.attention.attention -> fastdiff.ops.attention)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, is_package: bool, node) -> List[str]:
    """The fastdiff modules one import statement reads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:  # relative: from the module's package, one level up per extra dot
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        # `from P import x` reads the submodule P.x where there is one, else P itself
        names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source for alias in node.names]
    return [owner for owner in map(_owner, names) if owner and owner.split(".")[0] == "fastdiff"]


def _lazy_targets(module: str, tree) -> List[Tuple[str, int]]:
    """The submodules a package's ``_EXPORTS`` / ``_SUBMODULES`` tables name, with their lines."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in ("_EXPORTS", "_SUBMODULES")
                                                for t in node.targets):
            values = node.value.values if isinstance(node.value, ast.Dict) else getattr(node.value, "elts", [])
            found += [(_owner(f"{module}.{v.value}"), v.lineno) for v in values
                      if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return sorted({(owner, line) for owner, line in found if owner and owner != module})


def _imports() -> Dict[str, List[Tuple[str, int, bool]]]:
    """module -> [(imported module, line, at module level)]."""
    edges = {}
    for module, (path, is_package) in MODULES.items():
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        top_level = {id(node) for node in tree.body}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = sorted(set(_targets(module, is_package, node)) - {module})
                found += [(t, node.lineno, id(node) in top_level) for t in targets]
        if is_package:
            found += [(t, line, False) for t, line in _lazy_targets(module, tree)]
        edges[module] = found
    return edges


IMPORTS = _imports()


def _layer(module: str) -> Optional[str]:
    if module in CLI_MODULES:
        return "cli"
    if module == "fastdiff":
        return "api"
    if module in SUPPORT_MODULES:
        return "support"
    parts = module.split(".")
    if len(parts) < 2:
        return None
    if parts[1] in APPS:
        return "apps"
    return parts[1] if parts[1] in LAYERS else None


def _cycles() -> List[List[str]]:
    """The import circles: for each group of modules that import each other (a strongly
    connected component, Tarjan's algorithm), the shortest circle from the group's first
    module through each other member, as paths a -> ... -> a."""
    graph = {m: sorted({t for t, _, _ in IMPORTS[m]}) for m in MODULES}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):  # recursive: the module graph is a few levels deep
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    def shortest(a, b, group):  # breadth first, inside the group (where every member reaches every other)
        paths, frontier = {a: [a]}, [a]
        while b not in paths:
            reached = []
            for v in frontier:
                for w in graph[v]:
                    if w in group and w not in paths:
                        paths[w] = paths[v] + [w]
                        reached.append(w)
            frontier = reached
        return paths[b]

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:
        first = min(group)
        for member in sorted(group - {first}):
            cycle = shortest(first, member, group) + shortest(member, first, group)[1:]
            if cycle not in cycles:
                cycles.append(cycle)
    return cycles


def _line(module: str, target: str) -> str:
    lines = [f"{line}{'' if top else ' (in a function)'}"
             for t, line, top in sorted(IMPORTS[module], key=lambda item: item[1]) if t == target]
    return f"{MODULES[module][0][len(ROOT) + 1:]}:{', '.join(lines)}"


def test_the_walk_sees_the_package():
    # a guard on the walker itself: it must find the layers and resolve relative imports
    assert "fastdiff.pipelines.base" in MODULES and "fastdiff.ops" in MODULES
    assert any(t.startswith("fastdiff.ops") for t, _, _ in IMPORTS["fastdiff"])  # lazy: its _EXPORTS table
    assert any(t.startswith("fastdiff.models") for t, _, _ in IMPORTS["fastdiff.pipelines.stable_diffusion"])


def test_no_import_circles():
    cycles = _cycles()
    report = ["  " + " -> ".join(c) + "\n    " + "\n    ".join(_line(a, b) for a, b in zip(c, c[1:]))
              for c in cycles]
    assert not cycles, "import circles between fastdiff modules:\n" + "\n".join(report)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if _layer(m) is None)
    assert not unplaced, f"modules outside every layer of tests/test_house.py LAYERS (place them): {unplaced}"


def _upward(at_module_level: bool) -> List[str]:
    found = []
    for module, imports in sorted(IMPORTS.items()):
        mine = _layer(module)
        for target, line, top in imports:
            theirs = _layer(target)
            if top == at_module_level and mine and theirs and LAYERS.index(theirs) < LAYERS.index(mine):
                found.append(f"{MODULES[module][0][len(ROOT) + 1:]}:{line} {module} ({mine}) imports "
                             f"{target} ({theirs})")
    return found


def test_module_level_imports_only_go_down_the_layers():
    found = _upward(at_module_level=True)
    assert not found, f"upward imports (layers top to bottom: {' -> '.join(LAYERS)}):\n  " + "\n  ".join(found)


def test_function_level_imports_only_go_down_the_layers():
    found = _upward(at_module_level=False)
    assert not found, (f"upward imports inside functions (layers top to bottom: {' -> '.join(LAYERS)}):\n  "
                       + "\n  ".join(found))


def test_no_file_over_500_lines():
    long = []
    for path, _ in sorted(MODULES.values()):
        with open(path, encoding="utf-8") as fh:
            count = sum(1 for _ in fh)
        if count > MAX_LINES:
            long.append(f"{path[len(ROOT) + 1:]}: {count} lines")
    assert not long, f"files over {MAX_LINES} lines (split them along their seams):\n  " + "\n  ".join(long)
