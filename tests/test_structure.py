"""Structure guards (issue 16): the engine stays readable and layered.

- no module of strive_engine or kernels (the package strive_kernels) is longer than 600 lines, and no function
  longer than 100 lines;
- strive_engine has no import cycle (every import counts: at module level, inside a function, or under
  TYPE_CHECKING — a lazy import is still a dependency, and importing `a.b` runs the package `a` first);
- kernels never imports strive_engine (it is a separate package that depends on torch/triton only).

The checkers are plain functions over source text, tested on small made-up packages first, so each guard is
shown to fail when its rule is broken.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"strive_engine": ROOT / "strive_engine", "strive_kernels": ROOT / "kernels"}  # import name -> folder
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


# ------------------------------------------------------------------------------------------ checkers


def modules(name: str, folder: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py below `folder` (a package `name`)."""
    out = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join([name, *parts])] = path
    return out


def long_modules(files: dict[str, Path], limit: int = MAX_MODULE_LINES) -> list[str]:
    return [f"{m}: {n} lines" for m, p in files.items() if (n := len(p.read_text().splitlines())) > limit]


def long_functions(files: dict[str, Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every def (methods and nested ones too) longer than `limit` lines, decorators excluded."""
    out = []
    for m, p in files.items():
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{m}.{node.name} (line {node.lineno}): {n} lines")
    return out


def imported(module: str, path: Path) -> set[str]:
    """Every module name an import statement anywhere in `path` names (relative imports resolved); for
    `from a import b` both `a` and `a.b` (b may be a submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of `files` it imports; importing `a.b.c` also runs the packages `a.b` and `a`
    (a package never depends on itself that way)."""
    graph = {}
    for m, p in files.items():
        deps = set()
        for name in imported(m, p):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in files and dep != m and not m.startswith(dep + "."):
                    deps.add(dep)
        graph[m] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def forbidden_imports(files: dict[str, Path], prefix: str) -> list[str]:
    """`m imports n` for every import of `prefix` or a module below it by a module outside it."""
    return [f"{m} imports {n}" for m, p in files.items() if not (m == prefix or m.startswith(prefix + "."))
            for n in sorted(imported(m, p)) if n == prefix or n.startswith(prefix + ".")]


def cycle_edges(graph: dict[str, set[str]], comp: list[str]) -> str:
    """`a -> b` for every import inside one component: what to cut."""
    return ", ".join(f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in comp)


# ------------------------------------------------------------------------- the checkers can fail


def _package(tmp: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        (tmp / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "pkg" / rel).write_text(text)
    return modules("pkg", tmp / "pkg")


def test_checkers_find_cycles_long_code_and_forbidden_imports(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(100))
    files = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.b import f\n",
        "b.py": "def f():\n    from pkg import a  # a lazy import is a dependency too\n",
        "c.py": "from . import d\n",                                 # relative: pkg.d
        "d.py": "import pkg.sub.e\n",                                # runs pkg.sub first
        "sub/__init__.py": "from pkg.c import X\n",
        "sub/e.py": f"def long():\n{body}\n" + "\n" * 600,
        "ok.py": "from pkg.sub.e import long\nimport torch\n",
    })
    graph = import_graph(files)
    assert graph["pkg.c"] == {"pkg.d"} and graph["pkg.d"] == {"pkg.sub", "pkg.sub.e"}
    assert graph["pkg.sub.e"] == set()  # a module inside a package does not depend on its own package
    assert cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d", "pkg.sub"]]
    assert cycle_edges(graph, ["pkg.a", "pkg.b"]) == "pkg.a -> pkg.b, pkg.b -> pkg.a"
    assert long_functions(files) == ["pkg.sub.e.long (line 1): 101 lines"]
    assert long_modules(files) == ["pkg.sub.e: 701 lines"]
    assert forbidden_imports(files, "pkg.sub") == ["pkg.d imports pkg.sub.e", "pkg.ok imports pkg.sub.e",
                                                "pkg.ok imports pkg.sub.e.long"]
    assert forbidden_imports(files, "torch") == ["pkg.ok imports torch"]


# ------------------------------------------------------------------------------------------- guards


def test_no_module_over_600_lines_and_no_function_over_100():
    files = {m: p for name, folder in PACKAGES.items() for m, p in modules(name, folder).items()}
    assert len(files) > 40, sorted(files)  # both packages were read
    problems = long_modules(files) + long_functions(files)
    assert not problems, "split these:\n" + "\n".join(problems)


def test_strive_engine_has_no_import_cycle():
    graph = import_graph(modules("strive_engine", PACKAGES["strive_engine"]))
    assert sum(map(len, graph.values())) > 50  # the engine's imports were read
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(cycle_edges(graph, c) for c in found)


def test_kernels_never_import_strive_engine():
    files = modules("strive_kernels", PACKAGES["strive_kernels"])
    assert forbidden_imports(files, "torch")  # the imports were read
    bad = forbidden_imports(files, "strive_engine")
    assert not bad, bad
