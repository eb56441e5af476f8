"""The layering, checked from the source: who may import whom, no import cycles, lean model files.

Layers, bottom to top (a module may import its own layer or a lower one, at module level and inside functions):

    0 cinedit.configs     1 cinedit.runtime     2 cinedit.data     3 cinedit.tokenizer
    4 cinedit.generator   5 cinedit.eval        6 cinedit (the root modules) and cinedit.demo

Every project file is parsed with `ast` (nothing is imported), so a violation anywhere is found even in code that
no other test runs. The last test imports the model files for real, in a fresh interpreter.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject's [tool.setuptools.package-dir])
FOLDERS = {
    "cinedit": "cinedit",
    "configs": "cinedit.configs",
    "data": "cinedit.data",
    "tokenizer": "cinedit.tokenizer",
    "generator": "cinedit.generator",
    "eval": "cinedit.eval",
}
# package -> layer; a module's layer is that of its longest matching package
LAYERS = {
    "cinedit.configs": 0,
    "cinedit.runtime": 1,
    "cinedit.data": 2,
    "cinedit.tokenizer": 3,
    "cinedit.generator": 4,
    "cinedit.eval": 5,
    "cinedit.demo": 6,
    "cinedit": 6,
}
# Model definitions load on a machine without a process group: no distributed code in them, in any form.
MODEL_FILES = ["generator/model.py", "generator/math.py", "tokenizer/model.py", "tokenizer/math.py"]
DISTRIBUTED = ("torch.distributed", "colossalai")
DISTRIBUTED_PROJECT = ("cinedit.generator.parallel", "cinedit.runtime.dist", "cinedit.runtime.booster")


def layer(module: str) -> int:
    for package in sorted(LAYERS, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return LAYERS[package]
    raise ValueError(f"{module} is not a cinedit module")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [*FOLDERS[rel.parts[0]].split("."), *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> dict[str, Path]:
    """Module name -> file, for every .py file of the installed packages."""
    return {module_name(p): p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}


MODULES = project_files()


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root
    line: int
    target: str  # the module imported: `from a import b` gives a.b when that is a module, else a
    local: bool  # inside a function (runs when called, not when the module loads)
    type_only: bool  # under `if TYPE_CHECKING:` (never runs)
    has_comment: bool  # a `# ...` comment on one of the statement's lines

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute name of `from ... import` (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(path: Path) -> list[Import]:
    """Every import statement of a file, wherever it is, with the module(s) it names."""
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    comments = {
        tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT
    }
    module, rel = module_name(path), str(path.relative_to(ROOT))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def add(node: ast.stmt, target: str, local: bool, type_only: bool) -> None:
        has_comment = any(n in comments for n in range(node.lineno, (node.end_lineno or node.lineno) + 1))
        imp = Import(rel, node.lineno, target, local, type_only, has_comment)
        if imp not in found:  # `from a import b, c` of two names of one module: one import of a
            found.append(imp)

    def visit(node: ast.AST, local: bool, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name, local, type_only)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node, is_package)
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                add(node, sub if sub in MODULES or not base.startswith("cinedit") else base, local, type_only)
        for field, value in ast.iter_fields(node):
            children = value if isinstance(value, list) else [value]
            for child in children:
                if not isinstance(child, ast.AST):
                    continue
                inner_local = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                inner_type = type_only or (
                    isinstance(node, ast.If) and field == "body" and _is_type_checking(node.test)
                )
                visit(child, inner_local, inner_type)

    visit(tree, False, False)
    return found


IMPORTS = {name: imports_of(path) for name, path in MODULES.items()}


def _project(target: str) -> bool:
    return target == "cinedit" or target.startswith("cinedit.")


def test_the_layer_table_covers_every_project_module():
    assert len(MODULES) > 50, sorted(MODULES)
    assert {"cinedit.cli", "cinedit.runtime.dist", "cinedit.data.meta", "cinedit.eval.recon"} <= set(MODULES)
    for name in MODULES:
        layer(name)  # raises for a module outside the table


def test_no_module_imports_a_higher_layer():
    bad = [
        f"{imp.where()} imports {imp.target} (layer {layer(imp.target)}) from layer {layer(name)}"
        for name, imps in IMPORTS.items()
        for imp in imps
        if _project(imp.target) and layer(imp.target) > layer(name)
    ]
    assert not bad, (
        "imports of a higher layer (move the code down, or the caller up; layers: "
        + ", ".join(f"{k}={v}" for k, v in LAYERS.items())
        + "):\n  "
        + "\n  ".join(bad)
    )


def test_every_imported_project_module_exists():
    """An import of a cinedit module that is not there (a stale name after a move) would hide from the layer check."""
    bad = [
        f"{imp.where()} imports {imp.target}, which is not a module or package of this checkout"
        for imps in IMPORTS.values()
        for imp in imps
        if _project(imp.target) and imp.target not in MODULES
    ]
    assert not bad, "\n  ".join(["imports of unknown cinedit modules:", *bad])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a chain that ends where it starts) per strongly connected component with a cycle (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    def chain(start: str, members: set[str]) -> list[str]:
        # breadth-first from start's successors back to start, inside the component: a shortest cycle
        paths = {w: [start, w] for w in sorted(graph[start]) if w in members}
        queue = list(paths)
        while queue:
            v = queue.pop(0)
            if v == start:
                return paths[v]
            for w in sorted(graph[v]):
                if w in members and w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
        raise AssertionError("unreachable: a component always has a cycle through each member")

    return [chain(comp[0], set(comp)) for comp in components]


def test_relative_imports_resolve_against_the_importing_module():
    def resolve(stmt: str, module: str, is_package: bool = False) -> str:
        return _resolve(module, ast.parse(stmt).body[0], is_package)

    assert resolve("from . import meta", "cinedit.data.sample") == "cinedit.data"
    assert resolve("from .meta import x", "cinedit.data.sample") == "cinedit.data.meta"
    assert resolve("from ..configs import data", "cinedit.data.sample") == "cinedit.configs"
    assert resolve("from .meta import x", "cinedit.data", is_package=True) == "cinedit.data.meta"
    assert resolve("from cinedit.data import meta", "cinedit.eval.recon") == "cinedit.data"


def test_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"], ["d", "d"]]


def test_no_import_cycles_between_project_modules():
    """Among the imports that run when a module loads (module level, not `if TYPE_CHECKING:`)."""
    graph = {
        name: {imp.target for imp in imps if not imp.local and not imp.type_only and imp.target in MODULES}
        for name, imps in IMPORTS.items()
    }
    cycles = [" -> ".join(str(MODULES[m].relative_to(ROOT)) for m in c) for c in _cycles(graph)]
    assert not cycles, "import cycles between project modules:\n  " + "\n  ".join(cycles)


def _distributed_uses(path: Path) -> list[str]:
    """Imports of torch.distributed / colossalai / the project's distributed modules, `torch.distributed.x`, and
    strings that name them (a dynamic import)."""
    rel = str(path.relative_to(ROOT))
    tree = ast.parse(path.read_text(), filename=str(path))
    banned = DISTRIBUTED + DISTRIBUTED_PROJECT
    out = []

    def is_banned(name: str) -> bool:
        return any(name == b or name.startswith(b + ".") for b in banned)

    for imp in imports_of(path):
        if is_banned(imp.target):
            out.append(f"{imp.where()} imports {imp.target}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "distributed":  # torch.distributed.is_initialized()
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                out.append(f"{rel}:{node.lineno} uses torch.distributed")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and is_banned(node.value.split(":")[0]):
            out.append(f"{rel}:{node.lineno} names {node.value!r} (importlib.import_module?)")
    return sorted(set(out))


def test_model_files_import_no_distributed_code():
    bad = [use for f in MODEL_FILES for use in _distributed_uses(ROOT / f)]
    assert not bad, "model files must load without distributed code (move it to generator/parallel.py):\n  " + (
        "\n  ".join(bad)
    )


def test_function_local_project_imports_say_why():
    """Function-local imports stay only to keep `cinedit --help` fast or to guard an optional dependency, each with a
    one-line reason on the import's line: `from cinedit.x import y  # here, not at the top: ...`."""
    bad = [
        f"{imp.where()} imports {imp.target} inside a function without a reason comment"
        for imps in IMPORTS.values()
        for imp in imps
        if imp.local and _project(imp.target) and not imp.has_comment
    ]
    assert not bad, (
        "function-local imports of cinedit modules need a `# reason` on their line (or move them to the top):\n  "
        + "\n  ".join(bad)
    )


# Run in a fresh interpreter: what importing the model files loads beyond what `import torch` already did.
PROBE = textwrap.dedent(
    """
    import sys
    import torch
    before = set(sys.modules)
    import cinedit.generator.model, cinedit.tokenizer.model
    print("\\n".join(sorted(set(sys.modules) - before)))
    """
)


def test_importing_the_models_loads_no_distributed_code():
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    new = res.stdout.split()
    assert "cinedit.generator.model" in new and "cinedit.tokenizer.model" in new, new
    bad = [m for m in new if m.startswith(DISTRIBUTED) or m in DISTRIBUTED_PROJECT]
    # project modules first: they say where it came from; then the first few of torch's and ColossalAI's
    shown = sorted(bad, key=lambda m: (not m.startswith("cinedit"), m))[:15]
    more = f"\n  ... and {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
    assert not bad, (
        f"importing cinedit.generator.model and cinedit.tokenizer.model (after `import torch`) also loaded {len(bad)} "
        f"distributed module(s):\n  " + "\n  ".join(shown) + more
    )


@pytest.mark.parametrize("name", sorted(DISTRIBUTED_PROJECT))
def test_the_distributed_modules_exist(name):
    """The names the probe watches for are real modules (a rename would make the probe pass vacuously)."""
    assert name in MODULES
