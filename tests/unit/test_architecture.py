"""The shape of the codebase, checked: no import cycles, the engine never imports the application,
the Triton kernels import nothing of peftkern, and they never collide with another package's
``triton_kernels``.

Imports are read from the source (every ``import`` and ``from ... import`` anywhere in a
module, inside functions too, and ``importlib.import_module("...")`` with a literal name),
so a cycle cannot hide behind an import placed inside a function.
"""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# repository folder -> installed package (setup.py's package_dir)
PACKAGES = {"peftkern": "peftkern", "triton_kernels": "peftkern_triton"}
COMPILED = {"peftkern._C"}


def _modules():
    out = {}
    for folder, package in PACKAGES.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = list(f.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = f
    return out


def _targets(module, node, mods, is_package):
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.Call):
        return [node.args[0].value]
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods or f"{base}.{a.name}" in COMPILED else base
            for a in node.names]


def import_graph():
    mods = _modules()
    graph = {}
    for module, path in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            dynamic = (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
                       and node.args and isinstance(node.args[0], ast.Constant))
            if not (isinstance(node, (ast.Import, ast.ImportFrom)) or dynamic):
                continue
            for target in _targets(module, node, mods, path.name == "__init__.py"):
                if target in COMPILED:
                    continue
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40
    assert cycles(graph) == []


def test_the_engine_never_imports_the_application():
    graph = import_graph()
    # the package root re-exports AllocatorCallback lazily and __main__ is the command line: both are doors
    # into the application, not engine code
    engine = [m for m in graph if not m.startswith("peftkern.app") and m not in ("peftkern", "peftkern.__main__")]
    offenders = {m: sorted(t for t in graph[m] if t.startswith("peftkern.app")) for m in engine}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_no_module_imports_the_package_root():
    """Everything inside imports the module it needs, never ``peftkern`` itself (which imports everything)."""
    graph = import_graph()
    assert sorted(m for m, edges in graph.items() if "peftkern" in edges) == []


def test_the_triton_kernels_import_nothing_of_peftkern():
    """The kernels and their launcher stand alone (torch and triton only): peftkern's triton backend
    composes them, never the other way round."""
    graph = import_graph()
    kernels = [m for m in graph if m.startswith("peftkern_triton")]
    assert len(kernels) >= 6
    assert {m: sorted(t for t in graph[m] if t.split(".")[0] == "peftkern") for m in kernels
            if any(t.split(".")[0] == "peftkern" for t in graph[m])} == {}
    code = "import sys, peftkern_triton.adapter_forward; print(sorted(m for m in sys.modules if m.startswith('peftkern')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(m.startswith("peftkern_triton") for m in eval(proc.stdout)), proc.stdout


def test_a_foreign_triton_kernels_package_does_not_shadow_ours(tmp_path):
    """triton-lang publishes a ``triton_kernels`` package; with one first on sys.path, peftkern still
    imports its own kernels (installed as peftkern_triton) and the foreign one stays importable."""
    foreign = tmp_path / "triton_kernels"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("FOREIGN = True\n")
    code = textwrap.dedent(f"""
        import os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, {str(tmp_path)!r})
        import triton_kernels
        assert triton_kernels.FOREIGN
        from peftkern.ops import registry
        backend = registry.load("triton")
        from peftkern.ops.backends import triton as ours
        import peftkern_triton
        assert backend is ours.BACKEND and peftkern_triton.__name__ == "peftkern_triton"
        assert not hasattr(peftkern_triton, "FOREIGN") and sys.modules["triton_kernels"].FOREIGN
        print("OK", peftkern_triton.__file__)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")
