"""The package's shape: no import cycles, no command module imported by library code, no huge modules.

The import graph is read from the source with :mod:`ast` (nothing is imported): an edge ``a -> b`` for
every ``import``/``from … import`` in ``a`` that names a module ``b`` of the package (``from p import
m`` names ``p.m`` when that is a module, else ``p``). *Module-level* imports are those executed when
the module is imported (top level, and inside top-level ``if``/``try``, except ``if TYPE_CHECKING``);
imports inside functions are counted only where a test says so.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "warplca"
MAX_LINES = 600
#: command modules: entry points that library modules must not import
COMMANDS = ("warplca.tasks.evaluate", "warplca.tasks.train", "warplca.cli")


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    out, stack = [], list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                stack.extend(handler.body)
    return out


def imports(module: str, module_level_only: bool = True) -> set[str]:
    """The package modules ``module`` imports (module-level ones only, or every import statement)."""
    path, is_package = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if is_package else module.rpartition(".")[0]
    nodes = _module_level(tree) if module_level_only else [
        n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(r for a in node.names if (r := _resolve(a.name)))
            continue
        assert isinstance(node, ast.ImportFrom)
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        for alias in node.names:
            full = f"{base}.{alias.name}"
            target = full if full in MODULES else _resolve(base)
            if target:
                out.add(target)
    out.discard(module)
    return out


def graph(module_level_only: bool = True) -> dict[str, set[str]]:
    return {m: imports(m, module_level_only) for m in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in edges[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_graph_sees_the_package() -> None:
    assert "warplca.config" in MODULES and "warplca.tasks.evaluate" in MODULES
    assert "warplca.settings" in imports("warplca.tasks.stage_targets")
    assert "warplca.tasks.stage_targets" in imports("warplca.tasks.predictor_fit")  # from p import m
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_warplca_modules_at_module_level() -> None:
    found = cycles(graph(module_level_only=True))
    assert found == [], f"module-level import cycles: {found}"


def test_settings_import_nothing_of_the_package() -> None:
    """The declarations' machinery sits below every layer, so any module may declare settings."""
    assert graph(module_level_only=False)["warplca.settings"] == set()


def _lint_imports(config: Path | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
            "sys.exit(lint_imports_command())"]
    if config is not None:
        args += ["--config", str(config)]
    return subprocess.run(args, cwd=SRC.parent, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(SRC)})


def test_layers_contract_is_kept() -> None:
    """maths → networks → data → coder/bundle → evaluation → LightningModules → stages → CLI, checked by
    import-linter with the contract in pyproject.toml (imports inside functions included)."""
    res = _lint_imports()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "KEPT" in res.stdout


def test_layers_contract_can_fail(tmp_path: Path) -> None:
    """The same tool refuses the layering turned upside down."""
    inverted = tmp_path / "inverted.toml"
    inverted.write_text('[tool.importlinter]\nroot_package = "warplca"\n\n[[tool.importlinter.contracts]]\n'
                        'name = "inverted"\ntype = "layers"\nlayers = ["warplca.lca", "warplca.tasks"]\n')
    res = _lint_imports(inverted)
    assert res.returncode != 0 and "warplca.tasks" in res.stdout and "BROKEN" in res.stdout


def test_no_library_module_imports_a_command_module() -> None:
    """``tasks.evaluate`` / ``tasks.train`` / ``cli`` are entry points; library code imports the library
    modules they use (e.g. :mod:`warplca.evaluation.experiments`), at any level."""
    edges = graph(module_level_only=False)
    offenders = sorted(f"{m} -> {c}" for m, targets in edges.items() if m not in COMMANDS
                       for c in targets if c in COMMANDS)
    assert offenders == [], offenders


def _long_modules() -> dict[str, int]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            out[path.relative_to(SRC).as_posix()] = n
    return out


def test_no_module_under_src_warplca_over_600_lines() -> None:
    offenders = _long_modules()
    assert offenders == {}, f"modules over {MAX_LINES} lines (split them): {offenders}"


def test_docs_architecture_names_every_module() -> None:
    index = (SRC.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [p.relative_to(SRC).as_posix() for p in sorted(PACKAGE.rglob("*.py"))
               if f"`{p.relative_to(SRC).as_posix()}`" not in index]
    assert missing == [], f"modules not named in docs/architecture.md: {missing}"
