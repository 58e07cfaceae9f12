"""The package's imports: one way (trainer -> blip2_export -> engines -> runtime), no cycles between modules,
no ``_private`` name imported from another module. Function-level imports count as much as top-level ones."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "blip2_export", "engines", "runtime")
# who may import whom (a package always may import itself)
ALLOWED = {"trainer": {"blip2_export", "engines", "runtime"}, "blip2_export": {"engines", "runtime"},
           "engines": {"runtime"}, "runtime": set()}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """First-party module -> modules it imports; and the private names imported across modules."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = []
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    targets.append((sub, None) if sub in modules else (node.module, a.name))
            else:
                continue
            for target, name in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target not in modules or target == mod:
                    continue
                edges[mod].add(target)
                if name and name.startswith("_") and not name.startswith("__"):
                    private.append(f"{mod} imports {target}.{name}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_no_import_cycles_and_no_private_names_across_modules():
    edges, private = _imports(_modules())
    assert sum(len(e) for e in edges.values()) > 50  # the walk sees the package's imports
    assert _cycles(edges) == []
    assert private == []


def test_packages_import_one_way():
    edges, _ = _imports(_modules())
    wrong = sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs
                   if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]])
    assert wrong == []


def test_the_walk_finds_a_cycle_and_a_private_import(tmp_path):
    """The checker itself: a made-up pair of modules with both faults."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from runtime.b import _hidden\n")
    b.write_text("import runtime.a\n")
    edges, private = _imports({"runtime.a": a, "runtime.b": b})
    assert _cycles(edges) == [["runtime.a", "runtime.b", "runtime.a"]]
    assert private == ["runtime.a imports runtime.b._hidden"]
