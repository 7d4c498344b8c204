"""The import structure, read from the source (every executed import statement, those inside functions included): no
cycles between modules, and no arrow pointing up the layers compiler < store < runtime (a lower package never imports
a higher one)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ('compiler', 'store', 'runtime')  # lowest first


def project_imports() -> dict[str, set[str]]:
    """module -> project modules it imports ('compiler.spec' -> {'compiler.plan', ...})."""
    modules = {'.'.join(p.relative_to(ROOT).with_suffix('').parts): p
               for layer in LAYERS for p in (ROOT / layer).rglob('*.py')}
    modules = {m.removesuffix('.__init__'): p for m, p in modules.items()}
    graph = {}
    for name, path in modules.items():
        found = set()
        tree = ast.parse(path.read_text(), str(path))
        for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == 'TYPE_CHECKING']:
            block.body = []  # imports for annotations only are never executed
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from compiler import plan` imports the module compiler.plan;
                # `from compiler.plan import Plan` the module
                targets = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules else node.module
                           for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_the_project_is_found():
    graph = project_imports()
    assert {'compiler.families', 'compiler.spec', 'store.database', 'runtime.run'} <= set(graph)
    assert 'compiler.plan' in graph['compiler.spec']


def test_no_import_cycles():
    graph = project_imports()
    state, cycles = {}, []

    def visit(node, path):
        state[node] = 'open'
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 'done'

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, '\n'.join(' -> '.join(c) for c in cycles)


def test_no_arrow_points_up_the_layers():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    up = [f'{a} imports {b}' for a, targets in project_imports().items() for b in targets
          if rank[b.split('.')[0]] > rank[a.split('.')[0]]]
    assert not up, up
