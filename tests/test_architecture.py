"""The shape of the house (ARCHITECTURE.md), checked on the source: dependencies point down, no
import circles, no imports hidden inside functions except of optional heavy packages, no private
name used across files, no oversized module."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("softtf", "softtf_kernels")
# softtf's floors, bottom up; a module may import its own floor and the floors below it.
FLOORS = ["softtf_kernels", "softtf.core", "softtf.prompts", "softtf.inference", "softtf.methods", "softtf.cl", "softtf.bench", "softtf.cli"]
# Imported inside functions on purpose: optional or heavy packages only some commands need.
LAZY_OK = {"matplotlib", "peft", "PIL", "sklearn", "timm", "torch", "tqdm", "transformers", "triton"}
MAX_LINES = 450


def modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path, path.name == "__init__.py"


def resolve(module, is_pkg, node):
    """Absolute module names an import node refers to, with the names it takes from them."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names]
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    return [(target, a.name) for a in node.names]


def imports():
    """(module, target, name, inside_function, lineno) for every import in the packages."""
    out = []
    for module, path, is_pkg in modules():
        tree = ast.parse(path.read_text(), str(path))
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inner = {id(n) for f in funcs for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, name in resolve(module, is_pkg, node):
                    out.append((module, target, name, id(node) in inner, node.lineno))
    return out


def own(target):
    return target.split(".")[0] in PACKAGES


def floor(module):
    best = None
    for i, f in enumerate(FLOORS):
        if module == f or module.startswith(f + "."):
            best = i
    return best


def test_no_import_inside_a_function_except_optional_packages():
    bad = [f"{m}:{line} imports {t}" for m, t, _, inside, line in imports()
           if inside and (own(t) or t.split(".")[0] not in LAZY_OK)]
    assert not bad, bad


def test_no_private_name_across_files():
    known = {m for m, _, _ in modules()}
    bad = []
    for m, t, name, _, line in imports():
        if not own(t):
            continue
        private_module = any(p.startswith("_") and p != "_C" for p in t.split("."))
        sub = f"{t}.{name}" if name else None
        private_name = name is not None and name.startswith("_") and name != "_C" and sub not in known
        if private_module or private_name:
            bad.append(f"{m}:{line} takes {name or t} from {t}")
    assert not bad, bad


def test_dependencies_point_down_and_no_circles():
    graph = {}
    for m, t, name, inside, line in imports():
        if not own(t) or inside:
            continue
        graph.setdefault(m, set()).add(t)
        fm, ft = floor(m), floor(t)
        if m.startswith("softtf.") or m == "softtf":
            if m != "softtf" and fm is not None and ft is not None:
                assert ft <= fm, f"{m}:{line} (floor {FLOORS[fm]}) imports {t} from the floor above ({FLOORS[ft]})"
    # circles among modules (a package's __init__ importing its children is not one)
    def edges(m):
        return {t for t in graph.get(m, ()) if not m.startswith(t + ".") and t != m}

    state = {}

    def visit(m, stack):
        state[m] = "open"
        for t in edges(m):
            if state.get(t) == "open":
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(t):] + [t]) if t in stack else f"{m} -> {t}")
            if t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("module, path", [(m, p) for m, p, _ in modules()], ids=lambda v: str(v))
def test_module_size(module, path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines (at most {MAX_LINES}: split it by what it does)"
