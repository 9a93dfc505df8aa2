"""The rules of the house (docs/architecture.md), checked on the source: imports and app sizes.

Everything here reads the code with `ast` and `tokenize` (no model is loaded); only
`test_every_module_imports` imports the modules themselves.
"""

from __future__ import annotations

import ast
import importlib
import io
import pathlib
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("fedllm", "server", "clients")

# The one module under fedllm/cli/ that may import Flower: it writes Flower's connection config.
FLOWER_CLI_MODULE = "fedllm/cli/federation.py"
# Paths (relative to the repository, "/"-separated) that may import `flwr`; a trailing "/"
# allows a whole folder. `flwr_datasets` is a separate package and allowed anywhere.
FLOWER_ALLOWED = (
    "server/app.py",
    "clients/app.py",
    "fedllm/strategy/",
    "fedllm/mods/",
    "fedllm/wire.py",
    "fedllm/secure/app_pin.py",
    FLOWER_CLI_MODULE,
)
APP_MAX_LINES = {"server/app.py": 60, "clients/app.py": 120}


# -- reading the source ---------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One import statement: where it is, what it names, and how it runs."""

    path: str  # relative to REPO, "/"-separated
    line: int
    end_line: int
    targets: tuple[str, ...]  # absolute dotted names, as written (not yet resolved)
    in_function: bool
    type_only: bool  # under `if TYPE_CHECKING:`: never runs


def _source_files() -> list[pathlib.Path]:
    files = []
    for package in PACKAGES:
        files += [p for p in sorted((REPO / package).rglob("*.py")) if "__pycache__" not in p.parts]
    return files


def _rel(path: pathlib.Path, root: pathlib.Path = REPO) -> str:
    return path.relative_to(root).as_posix()


def _module_name(path: pathlib.Path, root: pathlib.Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: pathlib.Path, root: pathlib.Path = REPO) -> Iterator[Import]:
    """Every import statement in `path`, module level and inside functions alike."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def walk(nodes: list[ast.AST], in_function: bool, type_only: bool) -> Iterator[Import]:
        for child in nodes:
            if isinstance(child, ast.Import | ast.ImportFrom):
                if isinstance(child, ast.Import):
                    targets = tuple(alias.name for alias in child.names)
                else:
                    base = child.module or ""
                    if child.level:  # relative: `from . import x`, `from ..a import b`
                        parts = package.split(".")
                        parts = parts[: len(parts) - child.level + 1]
                        base = ".".join(parts + ([base] if base else []))
                    targets = (base, *(f"{base}.{alias.name}" for alias in child.names))
                end = child.end_lineno or child.lineno
                yield Import(_rel(path, root), child.lineno, end, targets, in_function, type_only)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                yield from walk(list(child.body), in_function, True)
                yield from walk(list(child.orelse), in_function, type_only)
            else:
                nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
                yield from walk(list(ast.iter_child_nodes(child)), nested, type_only)

    yield from walk(list(tree.body), False, False)


def _module_graph() -> dict[str, set[str]]:
    """Module -> the modules of fedllm/server/clients it imports when it runs.

    Function-level imports count (they run when the function does); `if TYPE_CHECKING:`
    imports do not. Importing `a.b.c` also runs the packages `a` and `a.b` first, so an edge
    to a module is also an edge to each package above it, except the importer's own packages
    (they are already running when it is imported).
    """
    files = _source_files()
    names = {_module_name(p) for p in files}
    graph: dict[str, set[str]] = {name: set() for name in names}
    for path in files:
        module = _module_name(path)
        for imp in _imports(path):
            if imp.type_only:
                continue
            for target in imp.targets:
                while target and target not in names:  # `from a import name`: name is no module
                    target = target.rpartition(".")[0]
                while target:
                    if target != module and not module.startswith(target + "."):
                        graph[module].add(target)
                    target = target.rpartition(".")[0]
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for succ in edges:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def _comment_lines(path: pathlib.Path) -> tuple[set[int], set[int]]:
    """Lines that carry a `#` comment, and the subset that hold nothing but one."""
    text = path.read_text(encoding="utf-8")
    with_comment: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            with_comment.add(token.start[0])
    lines = text.splitlines()
    only = {n for n in with_comment if lines[n - 1].lstrip().startswith("#")}
    return with_comment, only


def _unexplained_function_imports(path: pathlib.Path, root: pathlib.Path = REPO) -> list[str]:
    """Function-level imports with no comment on their own lines or on the line above.

    A comment-only line above a run of consecutive imports explains the whole run.
    """
    with_comment, comment_only = _comment_lines(path)
    inner = sorted((i for i in _imports(path, root) if i.in_function), key=lambda i: i.line)
    bad: list[str] = []
    run_explained = False
    previous_end = -1
    for imp in inner:
        own = any(n in with_comment for n in range(imp.line, imp.end_line + 1))
        above = imp.line - 1 in with_comment
        if previous_end != imp.line - 1:  # a new run of imports starts here
            run_explained = imp.line - 1 in comment_only
        if not (own or above or run_explained):
            bad.append(f"{imp.path}:{imp.line} imports {imp.targets[0]}")
        previous_end = imp.end_line
    return bad


def _imports_flower(imp: Import) -> bool:
    return any(t == "flwr" or t.startswith("flwr.") for t in imp.targets)


def _flower_allowed(path: str) -> bool:
    return any(path.startswith(a) if a.endswith("/") else path == a for a in FLOWER_ALLOWED)


# -- the rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("module", sorted(_module_name(p) for p in _source_files()))
def test_every_module_imports(module: str) -> None:
    """Each module of fedllm/, server/ and clients/ imports without error."""
    # Execute
    imported = importlib.import_module(module)
    # Assert
    assert imported.__name__ == module


def test_there_is_no_import_cycle_counting_function_level_imports() -> None:
    """No module reaches itself through imports that run, wherever they sit in the file."""
    # Prepare
    graph = _module_graph()
    # Execute
    cycles = _cycles(graph)
    # Assert
    assert graph, "no modules found"
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function() -> None:
    """The checker itself: a function-level import that closes a loop is a cycle."""
    # Prepare
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    # Execute
    cycles = _cycles(graph)
    # Assert
    assert cycles == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_only_the_apps_strategies_mods_wire_and_one_cli_module_import_flower() -> None:
    """`flwr` is imported only where docs/architecture.md allows it (`flwr_datasets` anywhere)."""
    # Prepare
    files = _source_files()
    # Execute
    offenders = sorted(
        f"{imp.path}:{imp.line}"
        for path in files
        if not _flower_allowed(_rel(path))
        for imp in _imports(path)
        if _imports_flower(imp)
    )
    cli_modules = [a for a in FLOWER_ALLOWED if a.startswith("fedllm/cli/")]
    # Assert
    assert cli_modules == [FLOWER_CLI_MODULE]
    assert not _flower_allowed("fedllm/cli/runs.py") and _flower_allowed("fedllm/mods/he.py")
    assert offenders == [], "these import flwr: " + ", ".join(offenders)


def test_fedllm_never_imports_the_flower_apps() -> None:
    """The library stands on its own: nothing under fedllm/ imports server/ or clients/."""
    # Execute
    offenders = sorted(
        f"{imp.path}:{imp.line}"
        for path in _source_files()
        if _rel(path).startswith("fedllm/")
        for imp in _imports(path)
        if any(t.split(".")[0] in ("server", "clients") for t in imp.targets)
    )
    # Assert
    assert offenders == []


def test_every_import_inside_a_function_says_why_in_a_comment() -> None:
    """A function-level import (an optional or heavy dependency kept off the start-up path)
    carries a `#` comment on its line or the line above."""
    # Execute
    bad = [line for path in _source_files() for line in _unexplained_function_imports(path)]
    # Assert
    assert bad == [], f"{len(bad)} function-level imports without a comment:\n" + "\n".join(bad)


def test_the_comment_rule_reads_comments_the_way_it_says(tmp_path: pathlib.Path) -> None:
    """The checker itself: own-line, line-above and run-of-imports comments count; none fails."""
    # Prepare
    source = tmp_path / "fedllm" / "example.py"
    source.parent.mkdir()
    source.write_text(
        "import os\n"
        "def explained():\n"
        "    import json  # heavy\n"
        "    # optional: only for plots\n"
        "    import csv\n"
        "    from typing import (\n"
        "        Any,\n"
        "    )\n"
        "    x = 1\n"
        "    import shutil\n"
        "    return x\n"
    )
    # Execute
    bad = _unexplained_function_imports(source, tmp_path)
    # Assert
    assert bad == ["fedllm/example.py:10 imports shutil"]


@pytest.mark.parametrize(("path", "limit"), sorted(APP_MAX_LINES.items()))
def test_the_flower_apps_stay_thin(path: str, limit: int) -> None:
    """server/app.py has at most 60 lines and clients/app.py at most 120: parse, build, run."""
    # Execute
    lines = len((REPO / path).read_text(encoding="utf-8").splitlines())
    # Assert
    assert lines <= limit, f"{path} has {lines} lines (at most {limit})"
