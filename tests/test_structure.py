"""The shape of adapterlib: no import cycle (imports inside functions included), the generic path free
of the Shapes world, importing it changes nothing in the user's process."""
import ast
import subprocess
import sys
from pathlib import Path

import adapterlib

PACKAGE = Path(adapterlib.__file__).parent
# the generic path: base loading, the adapter, training, sampling, checkpoints, the evaluation core and its detectors
GENERIC = ["model.base", "model.adapter", "training.train", "model.sample", "training.checkpoint",
           "evaluation.evaluate", "model.detectors", "training.config", "runs", "model.precision", "data.manifest",
           "training.progress", "analysis.figures", "analysis.gates", "files", "paths", "data.buckets",
           "training.cache", "training.distributed", "evaluation.basecache", "training.evalspec", "training.losses",
           "options"]
# the floors of the house, lowest first: a module may import its own floor and the floors below, never above.
# The top-level modules are leaves (they import no other floor); __main__ is the roof.
FLOORS = ["leaves", "data", "model", "shapes", "analysis", "training", "evaluation", "interop", "notebook", "__main__"]
LEAVES = {"options", "paths", "files", "runs"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every adapterlib module `path` imports, at any depth of the file (functions included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("adapterlib")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("adapterlib"):
                continue
            found.add(target)
            for alias in node.names:                       # `from . import shapes`: a module, not a name
                if (PACKAGE.parent / (target + "." + alias.name).replace(".", "/")).with_suffix(".py").exists() or \
                        (PACKAGE.parent / (target + "." + alias.name).replace(".", "/") / "__init__.py").exists():
                    found.add(f"{target}.{alias.name}")
    return found - {name}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for t in imports_of(path):
            # importing a.b.c imports its packages a.b and a too
            parts = t.split(".")
            targets |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)} & set(modules)
        edges[name] = targets - {name} - {"adapterlib"}
    return edges


def find_cycle(edges):
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


def test_no_import_cycle_in_adapterlib():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # and the graph holds function-level imports: evaluate imports sample inside images_for
    assert "adapterlib.model.sample" in graph()["adapterlib.evaluation.evaluate"]


def test_the_generic_path_does_not_import_the_shapes_world():
    edges = graph()
    for name in GENERIC:
        bad = {t for t in edges.get(f"adapterlib.{name}", ()) if t.startswith("adapterlib.shapes")}
        assert f"adapterlib.{name}" in edges, f"adapterlib.{name} is gone: update GENERIC"
        assert not bad, f"adapterlib.{name} imports {bad}"
    # at run time too: training on a manifest never loads it
    code = ("import sys, adapterlib.training.train, adapterlib.evaluation.evaluate, adapterlib.training.checkpoint; "
            "print(sorted(m for m in sys.modules if m.startswith('adapterlib.shapes')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def floor_of(module: str) -> int:
    part = module.split(".")[1]
    if part in LEAVES:
        return 0
    return FLOORS.index(part)


def test_every_module_stands_on_a_floor_and_imports_nothing_above_it():
    edges = graph()
    for name, targets in edges.items():
        if name == "adapterlib":
            continue
        part = name.split(".")[1]
        assert part in LEAVES or part in FLOORS, f"{name}: not on a floor of FLOORS (add its package there)"
        if part in LEAVES:
            assert targets <= {f"adapterlib.{leaf}" for leaf in LEAVES}, f"leaf {name} imports {targets}"
        up = {t for t in targets if floor_of(t) > floor_of(name)}
        assert not up, f"{name} (floor {FLOORS[floor_of(name)]}) imports {sorted(up)} from above"


def test_the_module_map_names_every_package_and_leaf():
    """adapterlib/__init__.py is the map a newcomer reads first: it names every floor's package and every leaf."""
    text = (PACKAGE / "__init__.py").read_text()
    for part in FLOORS[1:-1]:
        assert f"{part}/" in text, f"adapterlib/__init__.py does not name the package {part}/"
    for leaf in LEAVES:
        assert f"`{leaf}`" in text, f"adapterlib/__init__.py does not name the leaf {leaf}"
    for path in PACKAGE.glob("*/*.py"):
        if path.name != "__init__.py" and path.parent.name != "models":
            assert f"`{path.stem}`" in (path.parent / "__init__.py").read_text() or path.parent.name == "shapes", \
                f"{path.parent.name}/__init__.py does not name {path.stem}"


def test_importing_adapterlib_changes_nothing_in_the_process():
    code = ("import diffusers.utils.logging as d, transformers.utils.logging as t; "
            "import pkgutil, importlib, adapterlib; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(adapterlib.__path__, 'adapterlib.')]; "
            "from adapterlib.model.base import load_base; load_base(); "
            "print(d.is_progress_bar_enabled(), t.is_progress_bar_enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "True True"


def test_the_command_line_parses_without_loading_diffusers_or_the_bench():
    """`python -m adapterlib status RUN` or `--help` parses its arguments without importing diffusers (seconds on a
    small CPU): the commands import what they run when they run it."""
    code = ("import sys; from adapterlib.__main__ import _parser; _parser(); "
            "print(sorted(m for m in ('diffusers', 'transformers', 'adapterlib.evaluation.bench') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
