"""The layers of DESIGN.md import one way only, and ``import qcowlib`` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "qcowlib"

# Lower number = lower layer.  A module may import from its own layer or lower ones:
# errors/_units <- core <- formats/<fmt> <- formats/registry <- ops <- {cli, glance,
# validate}.  The registry (with ``qcowlib.formats()`` and the opener, which opens
# chains through it) names the formats' readers and writers and sits above them.
REGISTRY_LAYER = 3
REGISTRY_MODULES = (
    "qcowlib.formats",
    "qcowlib.formats.registry",
    "qcowlib.formats.opener",
    "qcowlib.formats.detect",
)
LAYERS = {
    "errors": 0,
    "_units": 0,
    "_json": 0,
    "checkreport": 0,
    "core": 1,
    "formats": 2,
    "ops": 4,
    "cli": 5,
    "glance": 5,
    "validate": 5,
}
#: Modules of a format that only turn bytes into values and back (they open no file).
PURE_MODULES = {
    "_layout.py",
    "_record.py",
    "detect.py",
    "probe.py",
    "registry.py",
    "codec.py",
    "header.py",
    "tables.py",
    "entries.py",
    "refcount.py",
    "snapshot.py",
    "bitmap.py",
    "compress.py",
    "layout.py",
    "spec.py",
    "metadata.py",
    "bat.py",
    "grains.py",
    "descriptor.py",
    "footer.py",
    "dynamic.py",
    "resources.py",
    "_inflate.py",
}


def _layer_of(module: str) -> float | None:
    if module in REGISTRY_MODULES:
        return REGISTRY_LAYER
    parts = module.split(".")
    if parts[0] != "qcowlib" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in REGISTRY_MODULES[:1]:
                # ``from qcowlib.formats import vdi`` imports the submodule, not the package.
                found.extend(f"{node.module}.{a.name}" for a in node.names)
            else:
                found.append(node.module)
    return found


def test_lower_layers_do_not_import_higher_ones() -> None:
    problems = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        own = _layer_of(module)
        if own is None:
            continue  # qcowlib/__init__.py and __main__ sit above everything
        for imported in _imports(path):
            other = _layer_of(imported)
            if other is not None and other > own:
                problems.append(f"{module} imports {imported}")
    assert not problems, "\n".join(problems)


def test_format_codecs_do_no_file_io() -> None:
    banned = {"os", "io.open", "open", "pathlib", "mmap"}
    problems = []
    for path in (SRC / "formats").rglob("*.py"):
        if path.name not in PURE_MODULES:
            continue  # readers, writers and checkers do I/O, through core/hostfile.py
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name in banned for a in node.names):
                problems.append(f"{path.relative_to(SRC)} imports os/pathlib")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "open"
            ):
                problems.append(f"{path.relative_to(SRC)} calls open()")
    assert not problems, problems


def test_import_qcowlib_is_light() -> None:
    code = (
        "import sys, qcowlib; "
        "heavy = [m for m in ('numpy', 'construct', 'openstack', 'rich', 'zstandard') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_every_module_imports_first() -> None:
    """No import cycle: each module imports when it is the first qcowlib module loaded."""
    code = """
import importlib, pathlib, sys
src = pathlib.Path(sys.argv[1])
failed = []
for path in sorted(src.rglob("*.py")):
    name = ".".join(path.relative_to(src.parent).with_suffix("").parts).removesuffix(".__init__")
    if name.endswith(".__main__"):
        continue
    for loaded in [m for m in sys.modules if m == "qcowlib" or m.startswith("qcowlib.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
"""
    out = subprocess.run(
        [sys.executable, "-c", code, str(SRC)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def _module_names() -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _load_time_imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """qcowlib modules imported when ``name`` loads: module-level imports, not those in
    functions (lazy) or under ``if TYPE_CHECKING``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if test not in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                tail = [node.module] if node.module else []
                module = ".".join([*base, *tail] if node.level else tail)
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)

    visit(ast.parse(path.read_text(), str(path)).body)
    return {m for m in found if m in known and m != name}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root, deps in graph.items():
        if root in state:
            continue
        path: list[str] = [root]
        todo: list[list[str]] = [sorted(deps)]
        state[root] = 1
        while todo:
            if not todo[-1]:
                state[path.pop()] = 2
                todo.pop()
                continue
            nxt = todo[-1].pop()
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                todo.append(sorted(graph[nxt]))
    return None


def test_cycle_finder() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_no_import_cycle() -> None:
    """Issue #11: no import cycle between modules (load-time imports; a function's own
    lazy import is not a cycle)."""
    known = _module_names()
    graph = {name: _load_time_imports(path, name, known) for name, path in known.items()}
    assert known.keys() > {"qcowlib.formats.qcow2.reader", "qcowlib.core.emit"}
    assert "qcowlib.formats.qcow2.header" in graph["qcowlib.formats.qcow2.reader"]
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


#: STYLE.md 14: a module over ~600 lines or a function over ~60 is a sign that two jobs
#: share it (issue #11 made these the limits).
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60


def test_modules_and_functions_can_be_read_in_one_sitting() -> None:
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            problems.append(f"{path.relative_to(SRC)}: {lines} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {length}")
    assert not problems, "\n".join(problems)
