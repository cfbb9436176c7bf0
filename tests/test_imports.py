"""The import graph of the ``hfl_jax`` package: no cycles, and no import from a higher layer.

The graph is built statically: every ``hfl_jax/**/*.py`` is parsed with :mod:`ast` and every
``import``/``from ... import`` in it counts, at module level or inside a function (a function-local
import only hides a cycle until the function runs; it does not remove it).

Edges. ``from P import n`` is an edge to ``P.n`` when that is a module of the package (importing a
submodule through its package) and to ``P`` otherwise; ``import a.b.c`` is an edge to ``a.b.c``.
A package's ``__init__`` is the module named after the package (``hfl_jax.data``), and its
re-export imports are ordinary edges: they take part in the cycle check. What is left out is the
implicit edge from a submodule to its parent package (Python runs ``hfl_jax/data/__init__.py``
before ``hfl_jax.data.stats``): every package whose ``__init__`` re-exports its submodules would
otherwise be a "cycle" of that kind, which is harmless because the ``__init__`` is already
running when the submodule is imported. The layering rule below forbids any import from a
higher layer, so an ``__init__`` never pulls in a module that imports back upward into it.

Layering (lowest first; a module may import from its own layer and from lower ones only):

0. foundations, which import nothing of hfl_jax: the root ``hfl_jax`` package, ``errors`` (the one
   :class:`ConfigError`), ``files``, ``packaged``, ``multihost``;
1. ``models`` and ``data``: model families and datasets (pure building blocks);
2. ``objectives``: losses, metrics and evaluation per objective (classification, causal LM), over
   models and data;
3. ``fed``: the federated engine, costs and time model, over models, data and objectives;
4. ``algos``: the algorithms (builders take a config object but never import :mod:`hfl_jax.config`;
   the error they raise lives in :mod:`hfl_jax.errors`);
5. ``config`` (typed configs; validation builds the algorithm, so it sits above ``algos``),
   ``checkpoint``, ``export``, ``report`` (run reports: they read records, owning none of their fields);
6. ``driver``: the one run loop;
7. ``sweep``: studies of runs (runs them through the driver);
8. ``study_report``: reports of studies;
9. ``cli`` and ``__main__``: the command line, which may import anything.
"""
from __future__ import annotations

import ast
from pathlib import Path

import hfl_jax

PACKAGE = Path(hfl_jax.__file__).parent

LAYERS = (
    ("hfl_jax", "hfl_jax.errors", "hfl_jax.files", "hfl_jax.packaged", "hfl_jax.multihost"),
    ("hfl_jax.models", "hfl_jax.data"),
    ("hfl_jax.objectives",),
    ("hfl_jax.fed",),
    ("hfl_jax.algos",),
    ("hfl_jax.config", "hfl_jax.checkpoint", "hfl_jax.export", "hfl_jax.report"),
    ("hfl_jax.driver",),
    ("hfl_jax.sweep",),
    ("hfl_jax.study_report",),
    ("hfl_jax.cli", "hfl_jax.__main__"),
)


# Edges of known cycles, left out of the cycle check until their owners remove them (each must
# still exist: test_known_cycle_edges_exist fails once one is gone, so its entry is deleted then).
# None at present.
KNOWN_CYCLE_EDGES: set = set()


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__init__`` as the package)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules that module ``name`` (file ``path``) imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: resolve against this module's package
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:   # `import hfl_jax.data.stats.x` -> the module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def layer_of(module: str) -> int | None:
    """The layer of the longest entry of :data:`LAYERS` that is ``module`` or a package above it."""
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for entry in names:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > best_len:
                best, best_len = i, len(entry)
    return best


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of ``graph``, or None (iterative depth-first search)."""
    state = {}   # absent: unvisited, 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_graph_sees_known_edges():
    """The parser finds module-level, function-local and submodule-through-package imports."""
    graph = import_graph()
    assert "hfl_jax.algos" in graph["hfl_jax.config"]              # function-local, in validate()
    assert "hfl_jax.algos.grouping" in graph["hfl_jax.algos.hierfedlora"]   # `from hfl_jax.algos import grouping`
    assert "hfl_jax.errors" in graph["hfl_jax.algos.hetlora"]
    assert "hfl_jax.data.stats" in graph["hfl_jax.algos.grouping"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = {m: {t for t in targets if (m, t) not in KNOWN_CYCLE_EDGES} for m, targets in import_graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_known_cycle_edges_exist():
    graph = import_graph()
    gone = [edge for edge in sorted(KNOWN_CYCLE_EDGES) if edge[1] not in graph.get(edge[0], ())]
    assert not gone, f"delete these from KNOWN_CYCLE_EDGES (the import is gone): {gone}"


def test_every_module_has_a_layer():
    missing = [m for m in import_graph() if layer_of(m) is None]
    assert not missing, f"add these modules to LAYERS in tests/test_imports.py: {missing}"


def test_no_upward_imports():
    bad = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
           for m, targets in sorted(import_graph().items()) for t in sorted(targets)
           if layer_of(t) is not None and layer_of(m) is not None and layer_of(t) > layer_of(m)]
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_one_config_error():
    """Every documented ``ConfigError`` is the class of :mod:`hfl_jax.errors`, and so are the
    names moved down to break cycles (re-exported where users imported them)."""
    import hfl_jax.config
    import hfl_jax.data
    import hfl_jax.data.report
    import hfl_jax.data.stats
    import hfl_jax.errors
    import hfl_jax.fed.tiers
    import hfl_jax.models
    import hfl_jax.models.config
    import hfl_jax.report

    assert hfl_jax.config.ConfigError is hfl_jax.errors.ConfigError
    assert hfl_jax.models.config.ConfigError is hfl_jax.errors.ConfigError
    assert hfl_jax.models.ConfigError is hfl_jax.errors.ConfigError
    assert issubclass(hfl_jax.errors.ConfigError, ValueError)
    assert hfl_jax.data.kl_divergence is hfl_jax.data.report.kl_divergence is hfl_jax.data.stats.kl_divergence
    assert hfl_jax.data.KL_EPS == hfl_jax.data.report.KL_EPS == hfl_jax.data.stats.KL_EPS == 1e-12
    assert hfl_jax.report.TIER_BYTES is hfl_jax.fed.tiers.TIER_BYTES
    assert hfl_jax.report.TIER_TIMES is hfl_jax.fed.tiers.TIER_TIMES
