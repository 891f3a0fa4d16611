"""The shape of adapterlib: no import cycle (imports inside functions included), the generic path free
of the Shapes world, importing it changes nothing in the user's process."""
import ast
import subprocess
import sys
from pathlib import Path

import adapterlib

PACKAGE = Path(adapterlib.__file__).parent
# the generic path: base loading, the adapter, training, sampling, checkpoints, the evaluation core and its detectors
GENERIC = ["base", "adapter", "train", "sample", "checkpoint", "evaluate", "detectors", "config", "runs", "precision",
           "data", "progress", "figures", "gates", "jsonio", "paths", "buckets", "encodings", "distributed", "basecache",
           "evalspec"]


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
    assert "adapterlib.sample" in graph()["adapterlib.evaluate"]


def test_the_generic_path_does_not_import_the_shapes_world():
    edges = graph()
    for name in GENERIC:
        bad = {t for t in edges[f"adapterlib.{name}"] if t.startswith("adapterlib.shapes")}
        assert not bad, f"adapterlib.{name} imports {bad}"
    # at run time too: training on a manifest never loads it
    code = ("import sys, adapterlib.train, adapterlib.evaluate, adapterlib.checkpoint; "
            "print(sorted(m for m in sys.modules if m.startswith('adapterlib.shapes')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_importing_adapterlib_changes_nothing_in_the_process():
    code = ("import diffusers.utils.logging as d, transformers.utils.logging as t; "
            "import pkgutil, importlib, adapterlib; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(adapterlib.__path__, 'adapterlib.')]; "
            "from adapterlib.base import load_base; load_base(); "
            "print(d.is_progress_bar_enabled(), t.is_progress_bar_enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "True True"


def test_the_command_line_parses_without_loading_diffusers_or_the_bench():
    """`python -m adapterlib status RUN` or `--help` parses its arguments without importing diffusers (seconds on a
    small CPU): the commands import what they run when they run it."""
    code = ("import sys; from adapterlib.__main__ import _parser; _parser(); "
            "print(sorted(m for m in ('diffusers', 'transformers', 'adapterlib.bench') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
