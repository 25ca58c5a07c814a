"""The import rule of docs/ARCHITECTURE.md, read from the source: every import (module level and inside
functions) of `safedig_core` and `nodes/` is resolved and checked against the layer table, the module graph
has no cycles, and the packages that must work without ComfyUI import in a clean interpreter."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = "safedig_core"

# Layer of each part of the core, lowest first. A module may import its own part and any part of a lower
# layer; `ALSO` lists the extra parts a part may import. The maths modules sit at the top of the package.
MATHS = {"safedig_core", "safedig_core.positions", "safedig_core.sae", "safedig_core.steering", "safedig_core.fast_gate",
         "safedig_core.schedule", "safedig_core.gate", "safedig_core.__main__"}
LAYERS = {
    "maths": 0,
    "formats": 1,
    "pipeline": 2,
    "convert": 2,
    "evaluation": 3,
    "adapters.comfy": 4,
    "adapters.diffusers": 4,
    "testbed": 5,
    "cli": 6,
}
ALSO: dict[str, set[str]] = {"maths": {"cli"}}  # `python -m safedig_core` runs the CLI
FOREIGN_RUNTIMES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "comfy_execution", "server",
                    "execution"}
MAY_IMPORT_COMFY = {"adapters.comfy", "testbed", "nodes"}  # testbed: lazily, to run its DiT through ComfyUI
MAY_IMPORT_DIFFUSERS = {"adapters.diffusers"}


def part_of(module: str) -> str:
    if module in MATHS:
        return "maths"
    if module == "nodes" or module.startswith("nodes."):
        return "nodes"
    rest = module[len(CORE) + 1:].split(".")
    if rest[0] == "adapters":
        return "adapters." + rest[1] if len(rest) > 1 else "maths"
    return rest[0]


def modules() -> dict[str, str]:
    """{dotted module name: file path} for the core and the node pack (nodes/ as `nodes.*`)."""
    found = {}
    for top in (CORE, "nodes"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, ".")
                    found[rel[:-9] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return found


def imports_of(name: str, path: str) -> list[tuple[str, int]]:
    """(absolute module, line) for every import in the file; relative imports resolved against `name`.
    `nodes/` imports the core as `..safedig_core`: those resolve to `safedig_core.*`."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
                target = ".".join(base + ([node.module] if node.module else []))
                if not base:  # nodes/ reaching the pack's root: `..safedig_core`
                    target = node.module or ""
            else:
                target = node.module or ""
            out.append((target, node.lineno))
            for a in node.names:  # `from pkg import module`
                out.append((f"{target}.{a.name}", node.lineno))
    return out


def internal_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for target, _ in imports_of(name, path):
            if target in mods and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def test_layers_import_only_downwards():
    mods = modules()
    bad = []
    for name, path in sorted(mods.items()):
        part = part_of(name)
        for target, line in imports_of(name, path):
            where = f"{os.path.relpath(path, REPO)}:{line}"
            top = target.split(".")[0]
            if top in FOREIGN_RUNTIMES and part not in MAY_IMPORT_COMFY and not target.startswith(CORE):
                bad.append(f"{where} imports {target}: only adapters/comfy and nodes/ may import ComfyUI")
            if top == "diffusers" and part not in MAY_IMPORT_DIFFUSERS:
                bad.append(f"{where} imports {target}: only adapters/diffusers may import diffusers")
            if target not in mods or not target.startswith(CORE) or part == "nodes":
                if part == "nodes" and target in mods and part_of(target) == "cli":
                    bad.append(f"{where} imports {target}: the nodes sit beside the CLI, not on it")
                continue
            other = part_of(target)
            if other == part or other in ALSO.get(part, set()):
                continue
            if LAYERS[other] >= LAYERS[part]:
                bad.append(f"{where}: {part} (layer {LAYERS[part]}) imports {target} ({other}, layer {LAYERS[other]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = internal_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if m.startswith(n + "."):
                continue  # a package importing its own submodules in __init__ is not a cycle
            if state.get(m) == 1:
                if not n.startswith(m + "."):
                    cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_a_violation(tmp_path):
    """The rule is not vacuous: a formats module importing the pipeline is reported."""
    f = tmp_path / "bad.py"
    f.write_text("from ..pipeline import train\nimport folder_paths\n")
    found = imports_of("safedig_core.formats.bad", str(f))
    assert ("safedig_core.pipeline", 1) in found and ("folder_paths", 2) in found
    assert LAYERS[part_of("safedig_core.pipeline.train")] > LAYERS[part_of("safedig_core.formats.bad")]


def test_every_part_has_a_docstring_saying_what_lives_there():
    for name, path in modules().items():
        doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read()))
        assert doc, f"{os.path.relpath(path, REPO)} has no module docstring"


NO_COMFY = [CORE, f"{CORE}.positions", f"{CORE}.sae", f"{CORE}.steering", f"{CORE}.gate", f"{CORE}.schedule", f"{CORE}.formats",
            f"{CORE}.pipeline", f"{CORE}.convert", f"{CORE}.evaluation", f"{CORE}.testbed", f"{CORE}.cli"]


@pytest.mark.parametrize("package", NO_COMFY)
def test_imports_without_comfyui(package):
    """Every non-adapter package, all its modules, imports in a fresh interpreter with no ComfyUI on the path."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"sys.path[:] = [p for p in sys.path if 'comfyui' not in p.lower()]\n"
        f"m = importlib.import_module({package!r})\n"
        "for sub in pkgutil.walk_packages(getattr(m, '__path__', []), m.__name__ + '.'):\n"
        "    if not sub.name.endswith('__main__'):\n"
        "        importlib.import_module(sub.name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('comfy', 'folder_paths', 'comfy_api'))\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
