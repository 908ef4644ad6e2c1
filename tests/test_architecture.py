"""The layering of the package (ARCHITECTURE.md), checked on the source: every import of every module,
including imports inside functions, goes to the same package or to a lower layer; nothing outside
pyboundary.cli imports it; module-level imports form no cycle; the facade exports every result class."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest

import pyboundary

ROOT = Path(pyboundary.__file__).parent

#: rank of each top-level part of the package: a module may import ranks <= its own, and modules of
#: the same rank only from their own package
LAYERS = {
    "_version": 0, "_utils": 0,
    "ops": 1,
    "zoo": 2,
    "subspaces": 3,
    "attacks": 4,
    "geometry": 5, "scans": 5, "adapters": 5,
    "experiments": 6,
    "cli": 7, "__main__": 8,
    "__init__": 8,  # the facade re-exports everything (lazily)
}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        yield path, parts


def _resolve(parts: list, node: ast.ImportFrom | ast.Import):
    """Absolute dotted targets inside pyboundary of an import statement in module ``parts``."""
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == "pyboundary":
                out.append(alias.name.split(".")[1:])
        return out
    is_pkg = parts[-1] == "__init__"
    package = parts[:-1] if not is_pkg else parts[:-1]
    if node.level == 0:
        if (node.module or "").split(".")[0] != "pyboundary":
            return out
        base = node.module.split(".")[1:]
    else:
        up = node.level - 1
        base = package[: len(package) - up] if up else list(package)
        if node.module:
            base = base + node.module.split(".")
    if not node.module or node.level and node.module is None:
        for alias in node.names:
            out.append(base + [alias.name])
    else:
        out.append(base)
    return out


def _imports(path: Path, parts: list, top_level_only: bool = False):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _resolve(parts, node):
                if target:
                    yield node.lineno, target


def _rank(parts: list) -> int:
    return LAYERS[parts[0]]


def test_every_module_is_in_a_layer():
    unknown = sorted({parts[0] for _, parts in _modules()} - set(LAYERS))
    assert not unknown, f"modules outside the layer table: {unknown} (add them to ARCHITECTURE.md and LAYERS)"


def test_imports_only_go_down_the_layers():
    bad = []
    for path, parts in _modules():
        if parts == ["__init__"]:
            continue
        for line, target in _imports(path, parts):
            if target[0] not in LAYERS:
                continue  # e.g. the compiled library
            same_package = target[0] == parts[0]
            if _rank(target) > _rank(parts) or (_rank(target) == _rank(parts) and not same_package):
                bad.append(f"{'/'.join(parts)}.py:{line} imports pyboundary.{'.'.join(target)}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_nothing_outside_cli_imports_cli():
    bad = [f"{'/'.join(parts)}.py:{line}" for path, parts in _modules() if parts[0] not in ("cli", "__main__")
           for line, target in _imports(path, parts) if target[0] == "cli"]
    assert not bad


def _module_name(parts: list) -> str:
    return ".".join(["pyboundary"] + (parts[:-1] if parts[-1] == "__init__" else parts))


def test_no_import_cycles_at_module_level():
    names = {_module_name(parts): (path, parts) for path, parts in _modules()}
    graph = {}
    for name, (path, parts) in names.items():
        edges = set()
        for _, target in _imports(path, parts, top_level_only=True):
            for k in range(len(target), 0, -1):  # longest prefix that is a module
                cand = "pyboundary." + ".".join(target[:k])
                if cand in names and cand != name:
                    edges.add(cand)
                    break
        graph[name] = edges
    # a package importing its own submodules is not a cycle unless a submodule imports the package back
    state, stack, cycles = {}, [], []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in graph[v]:
            if state.get(w) == 1:
                cycles.append(stack[stack.index(w):] + [w])
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in graph:
        if v not in state:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_submodules_are_not_shadowed_by_functions():
    import pyboundary.attacks.deepfool as engine
    import pyboundary.attacks.pgd as pgd_module

    assert inspect.ismodule(engine) and inspect.ismodule(pgd_module)
    assert callable(pyboundary.deepfool) and not inspect.ismodule(pyboundary.deepfool)


def test_facade_exports_every_public_function_and_its_result_class():
    missing = []
    for name in pyboundary.__all__:
        obj = getattr(pyboundary, name)
        if not inspect.isfunction(obj):
            continue
        ret = inspect.signature(obj).return_annotation
        ret = ret if isinstance(ret, str) else getattr(ret, "__name__", "")
        if ret and ret[0].isupper() and ret not in ("Tensor",) and not ret.startswith(("tuple", "dict", "list",
                                                                                      "Callable")):
            if ret not in pyboundary.__all__:
                missing.append(f"{name} -> {ret}")
    assert not missing, f"result classes not exported by pyboundary: {missing}"


def _result_classes():
    seen = []
    for name in pyboundary.__all__:
        obj = getattr(pyboundary, name)
        if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and hasattr(obj, "summary"):
            seen.append(obj)
    return seen


@pytest.mark.parametrize("cls", _result_classes(), ids=lambda c: c.__name__)
def test_result_classes_follow_the_protocol(cls):
    for method in ("summary", "format_summary", "to_numpy"):
        assert callable(getattr(cls, method, None)), f"{cls.__name__}.{method} missing"
    hints = inspect.signature(cls.summary).return_annotation
    assert hints in (dict, "dict"), f"{cls.__name__}.summary must return a dict, annotated {hints!r}"


def test_cli_has_exactly_the_documented_commands():
    from pyboundary.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    assert COMMANDS == ("demo", "scan", "show", "compare", "detect", "curvature", "topology", "track",
                        "reproduce")


def test_subpackages_import_standalone():
    for name in ("ops", "zoo", "subspaces", "attacks", "geometry", "scans", "experiments", "adapters", "cli"):
        importlib.import_module(f"pyboundary.{name}")
