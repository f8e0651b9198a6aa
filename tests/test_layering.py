"""The layering a newcomer can check: app → engine → family → store, cpu below family, train and eval beside
engine, nothing upward, no cycle between parts, and app imports no torch-bearing module at import time."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {  # part -> the parts it may import (besides itself)
    "errors": set(), "bounds": set(), "cli_types": set(), "store": {"errors", "bounds"}, "cpu": {"errors"},
    "corpora": {"errors"},
    "family": {"errors", "store", "cpu", "corpora"},  # q4 calibration reads training text
    "engine": {"errors", "family", "store", "cpu"},
    "train": {"errors", "family", "store", "cpu", "corpora", "cli_types"},
    "eval": {"errors", "engine", "family", "store", "cpu", "corpora", "cli_types"},  # chat answers decoded as served
    "bench": {"errors", "engine", "family", "store", "cpu", "eval", "corpora"},
    "cli": {"errors", "engine", "family", "store", "cpu", "eval", "corpora", "train", "bench", "app", "cli_types"},
    "app": {"errors", "bounds", "engine"},
}
# no torch
APP_AT_IMPORT = {"services.engine.interface", "services.engine.latency", "services.engine.tool_calls",
                 "services.engine.compact_json", "services.errors", "services.bounds"}


def _module(path: Path) -> str:
    names = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(names[:-1] if names[-1] == "__init__" else names)


def _part(module: str) -> str:
    names = module.split(".")
    return "app" if names[0] == "app" else names[1] if len(names) > 1 else "services"


def _imports(path: Path):
    """(imported module, at module level?) for every import of app or services in a file."""
    tree = ast.parse(path.read_text(), str(path))
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            if name.split(".")[0] in ("app", "services"):
                yield name, id(node) in top


def _edges() -> list[tuple[str, str, bool]]:
    files = [p for d in ("app", "services") for p in sorted((REPO / d).rglob("*.py"))]
    return [(_module(p), target, top) for p in files for target, top in _imports(p)]


def test_no_part_imports_one_above_it():
    upward = [(src, dst) for src, dst, _ in _edges()
              if _part(src) != _part(dst) and _part(dst) not in ALLOWED.get(_part(src), set())]
    assert not upward


def test_the_parts_form_no_cycle():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in _edges():
        if _part(src) != _part(dst):
            graph.setdefault(_part(src), set()).add(_part(dst))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
                   for nxt in graph.get(start, ()))

    assert not [part for part in graph if reaches(part, part, {part})]


def test_app_loads_no_torch_at_import():
    eager = [(src, dst) for src, dst, top in _edges() if _part(src) == "app" and top and _part(dst) != "app"
             and dst not in APP_AT_IMPORT]
    assert not eager
