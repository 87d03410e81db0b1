"""The package's import graph: no cycles, and imports go one way through the layers.

Every `import h2q...` / `from h2q... import` in every module counts, at module level or inside a
function alike: an import moved into a function to dodge a cycle is still a cycle.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "h2q"

# lower layers never import higher ones (a module may import its own layer and below)
LAYERS = {
    "core": (0, {"h2q.tokenizer", "h2q.errors", "h2q.config", "h2q.model", "h2q.perf"}),
    "cli": (1, {"h2q.cli"}),
    "compression": (2, {"h2q.lora", "h2q.quant", "h2q.gptq", "h2q.kvbase", "h2q.kvcache", "h2q.kvcompress", "h2q.optim"}),
    "io": (3, {"h2q.checkpoint", "h2q.data", "h2q.hf_format"}),
    "loops": (4, {"h2q.train", "h2q.generate", "h2q.session", "h2q.kvbench", "h2q.distill", "h2q.router",
                  "h2q.monitor"}),
    # and every h2q.evolve.* module; the report (the h2q.report package) draws training and evolve runs
    "evolve": (5, {"h2q.report", "h2q.report.common", "h2q.report.training", "h2q.report.evolve", "h2q.report.grid",
                   "h2q.report.social", "h2q.report.bench"}),
}
APPS = 6  # on top of everything: the REPL, the demo and one-shot inference (they load evolved agents)
APP_MODULES = {"h2q.chat", "h2q.infer"}
ENTRY_POINTS = {"h2q.train", "h2q.infer", "h2q.evolve.run"}  # the modules with a main(); only they use h2q.cli


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def h2q_imports(path: Path, modules: set[str]) -> set[str]:
    """The h2q modules `path` imports anywhere in it (`from h2q import x` counts as h2q.x when x is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("h2q")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("h2q"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs or {node.module}
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: h2q_imports(path, modules) - {name} for name, path in files.items()}


def layer(name: str) -> int:
    if name.startswith("h2q.evolve"):
        return LAYERS["evolve"][0]
    if name in APP_MODULES:
        return APPS
    for rank, members in LAYERS.values():
        if name in members:
            return rank
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_on_known_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_in_the_package():
    assert find_cycle(graph()) is None


def test_imports_go_down_the_layers():
    upward = [(m, d) for m, deps in graph().items() for d in deps if layer(d) > layer(m)]
    assert upward == []


def test_only_entry_points_use_the_cli_layer():
    users = {m for m, deps in graph().items() if "h2q.cli" in deps}
    assert users <= ENTRY_POINTS
