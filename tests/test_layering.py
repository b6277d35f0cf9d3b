"""The top-level modules form layers: a module imports only modules of lower layers (lazy imports inside
functions included), so there is no import circle and each file can be read and changed on its own."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Bottom up: a module may import modules of lower layers only.
LAYERS = {
    "cli": 0,  # errors and exit codes, imports nothing of ours
    "model": 1, "tokenizer": 1,
    "checkpoint": 2, "memory": 2, "sampling": 2, "cpu_ops": 2,  # cpu_ops: native kernels, measured choice
    "quantize": 3, "decode_kernels": 3, "medusa": 3,
    "tp": 4, "streaming": 4,  # slice / stream quantized modules
    "pipeline": 5, "drafting": 5, "compiled_step": 5,  # pipeline shares tp's start-up and counters
    "generate": 6,
    "convert_hf_checkpoint": 7, "eval": 7, "server": 7,  # the tools
}


def import_graph(folder: Path) -> dict:
    """module -> the set of top-level modules of `folder` it imports, anywhere in its source."""
    modules = {path.stem: path for path in folder.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def circles(graph: dict) -> list:
    """Every import circle found by depth-first search, as 'a -> b -> a'."""
    found, done = [], set()

    def visit(module, stack):
        if module in stack:
            found.append(" -> ".join(stack[stack.index(module):] + [module]))
            return
        if module in done:
            return
        for other in sorted(graph[module]):
            visit(other, stack + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return found


def test_no_import_circle_among_top_level_modules():
    assert circles(import_graph(ROOT)) == []


def test_every_module_imports_only_lower_layers():
    graph = import_graph(ROOT)
    assert set(graph) == set(LAYERS), "place a new top-level module in LAYERS"
    upward = [f"{module} (layer {LAYERS[module]}) imports {other} (layer {LAYERS[other]})"
              for module, imported in graph.items() for other in imported if LAYERS[other] >= LAYERS[module]]
    assert upward == []


def test_a_circle_is_found(tmp_path):
    """The check itself: a lazy import inside a function that closes a circle is caught."""
    (tmp_path / "low.py").write_text("def f():\n    from high import g\n    return g()\n")
    (tmp_path / "high.py").write_text("import low\n\ndef g():\n    return 1\n")
    (tmp_path / "alone.py").write_text("import os\n")
    graph = import_graph(tmp_path)
    assert graph == {"low": {"high"}, "high": {"low"}, "alone": set()}
    assert circles(graph) == ["high -> low -> high"]
