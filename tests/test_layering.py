"""The layer order, written once: a module imports only from its own package or from a layer below.

Every import counts, at module level or inside a function (a function-level import may defer a heavy
module, e.g. torch for a command that does not train; it may not hide an upward import or a cycle).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "trainer"

#: Bottom first. Packages in one entry do not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("jobs", "paths"),          # vocabulary: fields, choices, where files live; no torch
    ("device", "diffusion"),    # device/dtype decisions; pure diffusion math
    ("models",),                # ModelHandle and its backends
    ("lora",),                  # network, formats, files, metadata, SVD
    ("data", "merge"),          # datasets and caches; LoRA merge/resize
    ("sampling",),              # DDIM/LCM sampling over a handle, grids; previews during training use it
    ("train",),                 # context, plan, loop, modes, runner
    ("queue",),                 # SQLite store, worker
    ("ui",),                    # Gradio blocks
    ("host",),                  # what the WebUI glue needs
    ("cli",),                   # commands, one module each
    ("__main__",),              # python -m trainer: dispatches to cli
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of a trainer module in ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found += [(node.lineno, source + "." + a.name if source == "trainer" else source) for a in node.names]
    return [(line, m) for line, m in found if m == "trainer" or m.startswith("trainer.")]


def top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_package_has_a_layer():
    packages = {top_package(module_name(p)) for p in MODULES} - {""}
    assert packages <= set(RANK), f"add {sorted(packages - set(RANK))} to LAYERS"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_only_downward(path):
    here = top_package(module_name(path))
    upward = []
    for line, target in imported_modules(path):
        there = top_package(target)
        if not there or there == here:
            continue
        if RANK[there] >= RANK[here]:
            upward.append(f"line {line}: {target} ({there}, layer {RANK[there]}) from {here} (layer {RANK[here]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles_between_modules():
    graph = {module_name(p): {m for _, m in imported_modules(p)} for p in MODULES}
    graph = {k: {m for m in v if m in graph} for k, v in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1 and nxt != node and not node.startswith(nxt + "."):
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            assert cycle is None, " -> ".join(cycle)
