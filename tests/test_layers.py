"""The package's layers: data flows down. A module imports only from its own package or from a lower layer (imports
inside functions included), no two modules import each other (directly or in a cycle), and ``recipes`` is imported
by ``cli`` and the Python API (``api``) alone. The order is written once here and in docs/architecture.md."""

import ast
from pathlib import Path

import distillarena

# bottom to top; packages on one line are peers and may not import each other
LAYERS = [
    ["core"],
    ["objectives", "tasks", "decoding"],
    ["models"],
    ["attacks", "evaluate", "defenses", "teachers"],
    ["train", "forensics"],
    ["report"],
    ["game", "serve"],
    ["recipes"],
    ["cli", "api"],
]
LEVEL = {pkg: i for i, row in enumerate(LAYERS) for pkg in row}
ROOT = Path(distillarena.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every distillarena module ``name`` imports, at any depth of the file (function-level imports included)."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            if mod.split(".")[0] != "distillarena":
                continue
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "distillarena")
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {t for t in _imports(m, p) if t in mods and t != m} for m, p in mods.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "distillarena"


def test_every_package_has_a_layer():
    packages = {_package(m) for m in _modules()} - {"distillarena"}
    assert packages == set(LEVEL), f"give these a layer (or drop them): {sorted(packages ^ set(LEVEL))}"


def test_imports_only_go_down():
    bad = []
    for mod, targets in _graph().items():
        src = _package(mod)
        for t in targets:
            dst = _package(t)
            if src == "distillarena":  # the root (__version__) is below all and imports nothing but, lazily, the API
                if t != "distillarena.api":
                    bad.append(f"{mod} -> {t}")
            elif dst != src and dst != "distillarena" and LEVEL[dst] >= LEVEL[src]:
                bad.append(f"{mod} (layer {LEVEL[src]}) -> {t} (layer {LEVEL.get(dst, '?')})")
    assert not bad, "imports that do not go down:\n" + "\n".join(sorted(bad))


def test_recipes_are_imported_by_cli_alone():
    users = sorted(m for m, ts in _graph().items() if _package(m) not in ("recipes", "cli", "api")
                   and any(_package(t) == "recipes" for t in ts))
    assert not users


def test_no_import_cycles():
    graph = _graph()
    # a module importing its own package's __init__ (which re-exports it) is not a cycle worth failing on
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]) if t in stack else f"{m} -> {t}")
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_order_is_documented():
    doc = (ROOT.parents[1] / "docs" / "architecture.md").read_text()
    for row in LAYERS:
        assert " ".join(row) in doc, f"docs/architecture.md does not list the layer {' '.join(row)}"
