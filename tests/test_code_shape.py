"""The shape the code keeps: no import circles in vlm/, no function longer than a screen or two."""
from __future__ import annotations

import ast
from pathlib import Path

VLM = Path(__file__).resolve().parents[1] / "vlm"
MAX_FUNCTION_LINES = 120


def _module_imports(path: Path) -> set[str]:
    """Absolute names of the vlm modules a file imports at module level."""
    rel = path.relative_to(VLM.parent).with_suffix("")
    parts = list(rel.parts)
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = [p for p in package if p != "__init__"]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + (node.module.split(".") if node.module else []))
            if mod.startswith("vlm"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("vlm"))
    return out


def test_no_import_circles_in_vlm():
    files = {".".join(p.relative_to(VLM.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in VLM.rglob("*.py")}
    graph = {m: {d for d in _module_imports(p) if d in files and d != m} for m, p in files.items()}

    def visit(m, stack):
        for d in graph[m]:
            if d in stack:
                raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(d):], d]))
            visit(d, [*stack, d])

    for m in graph:
        visit(m, [m])


def test_no_function_over_120_lines():
    long = []
    for path in VLM.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(VLM.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 120 lines: " + "; ".join(long)
