"""Import cycles among synth modules, lazy (function-level) imports included; --strings also follows "module:name" references.

    python bench/import_cycles.py . [--strings]
"""
import ast, re, sys
from pathlib import Path
root = Path(sys.argv[1]); strings = "--strings" in sys.argv
mods = {}
for p in (root / "synth").rglob("*.py"):
    name = ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    mods[name] = p
def target(name):
    while name and name not in mods: name = name.rpartition(".")[0]
    return name or None
graph = {}
for name, p in mods.items():
    tree = ast.parse(p.read_text()); deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names: deps.add(target(a.name))
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            for a in node.names:
                deps.add(target(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else target(base))
        elif strings and isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"synth[\w.]*:\w+", node.value):
            deps.add(target(node.value.split(":")[0]))
    # a submodule import implies its package __init__ runs
    graph[name] = {d for d in deps if d and d != name}
for name in list(graph):
    parts = name.split(".")
    for i in range(1, len(parts)):
        pkg = ".".join(parts[:i])
        if pkg in mods and pkg != name: pass
# strongly connected components (Tarjan)
index = {}; low = {}; stack = []; on = set(); sccs = []; i = [0]
sys.setrecursionlimit(10000)
def visit(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in graph.get(v, ()):
        if w not in index: visit(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(sorted(comp))
for v in graph:
    if v not in index: visit(v)
for comp in sccs:
    edges = [f"{a}->{b}" for a in comp for b in sorted(graph[a]) if b in comp]
    print(len(comp), "modules:", " ".join(edges))
print(f"{len(sccs)} cycle group(s)")
