"""The package's layers, read from its imports with `ast` (module level and inside functions).

A module imports only its own layer, lower layers and the services; there is no import cycle
between modules of diffusion_jax; no mode imports another mode (evaluation does not sample
through the sample-mode driver). The rules are data (LAYERS, SERVICES, MODES below): moving a
module to another layer is one edit here. Every module must be placed, so a new file states
its layer when it lands.

To check another checkout (e.g. the main branch):
    DIFFUSION_JAX_LAYERS_ROOT=/path/to/checkout pytest -q tests/test_layers.py
"""
from __future__ import annotations

import ast
import os
import pathlib

import pytest

ROOT = pathlib.Path(os.environ.get('DIFFUSION_JAX_LAYERS_ROOT',
                                   pathlib.Path(__file__).resolve().parents[1]))
PACKAGE = 'diffusion_jax'

# Lowest first. A module belongs to the layer of its longest matching prefix.
LAYERS = (
    ('core', ('diffusion_jax', 'diffusion_jax.schedules', 'diffusion_jax.diffusion',
              'diffusion_jax.respace', 'diffusion_jax.timestep_sampling',
              'diffusion_jax.processes', 'diffusion_jax.cold', 'diffusion_jax.distillation')),
    ('networks', ('diffusion_jax.models', 'diffusion_jax.evaluation.inception',
                  'diffusion_jax.evaluation.convert_inception',
                  'diffusion_jax.evaluation.feature_net', 'diffusion_jax.evaluation.fid')),
    ('sampling', ('diffusion_jax.samplers', 'diffusion_jax.guidance',
                  'diffusion_jax.evaluation.likelihood')),
    ('run', ('diffusion_jax.run', 'diffusion_jax.checkpointing', 'diffusion_jax.config_validation',
             'diffusion_jax.defaults', 'diffusion_jax.train_state',
             'diffusion_jax.latents', 'diffusion_jax.text')),
    ('modes', ('diffusion_jax.train', 'diffusion_jax.generate', 'diffusion_jax.evaluation',
               'diffusion_jax.edit', 'diffusion_jax.distill')),
    ('faces', ('diffusion_jax.main', 'diffusion_jax.convert', 'diffusion_jax.encode',
               'diffusion_jax.notebook')),
)
# Services any layer may import; they import only each other.
SERVICES = ('diffusion_jax.sharding', 'diffusion_jax.input_pipeline', 'diffusion_jax.image_utils',
            'diffusion_jax.logging_utils')
# Each mode's modules: a mode imports no other mode (the sample-mode driver included).
MODES = {
    'train': ('diffusion_jax.train', 'diffusion_jax.distill'),
    'sample': ('diffusion_jax.generate',),
    'edit': ('diffusion_jax.edit',),
    'eval': ('diffusion_jax.evaluation.evaluate', 'diffusion_jax.evaluation.sample_quality'),
}


def module_files(root: pathlib.Path, package: str = PACKAGE) -> dict[str, tuple[pathlib.Path, bool]]:
    """{'diffusion_jax.x.y': (path, is_package)} for every .py file of the package."""
    out = {}
    for path in sorted((root / package).rglob('*.py')):
        parts = list(path.relative_to(root).with_suffix('').parts)
        is_package = parts[-1] == '__init__'
        if is_package:
            parts = parts[:-1]
        out['.'.join(parts)] = (path, is_package)
    return out


def import_graph(root: pathlib.Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from every import statement of the file
    (module level and inside functions; relative imports resolved). `from a import b` is an
    import of the module a.b when there is one, else of a."""
    files = module_files(root, package)

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition('.')[0]
        return name or None

    graph = {}
    for name, (path, is_package) in files.items():
        here = name if is_package else name.rpartition('.')[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split('.')[:len(here.split('.')) - (node.level - 1)]
                    source = '.'.join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ''
                targets = [f'{source}.{alias.name}' if f'{source}.{alias.name}' in files
                           else source for alias in node.names]
            else:
                continue
            edges.update(owner(t) for t in targets
                         if t == package or t.startswith(package + '.'))
        edges.discard(None)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _match(module: str, prefixes) -> int:
    """Length of the longest prefix in prefixes that module is or lies under (0: none)."""
    return max((len(p) for p in prefixes if module == p or module.startswith(p + '.')),
               default=0)


def layer_of(module: str) -> str | None:
    """'services', a layer name from LAYERS, or None (unplaced)."""
    best, name = _match(module, SERVICES), 'services'
    for layer, prefixes in LAYERS:
        length = _match(module, prefixes)
        if length > best:
            best, name = length, layer
    return name if best else None


def mode_of(module: str) -> str | None:
    for mode, prefixes in MODES.items():
        if _match(module, prefixes):
            return mode
    return None


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import against the rules, as 'a -> b: why'."""
    rank = {name: i for i, (name, _) in enumerate(LAYERS)}
    out = [f'{m}: in no layer (add it to LAYERS or SERVICES in tests/test_layers.py)'
           for m in sorted(graph) if layer_of(m) is None]
    for a in sorted(graph):
        for b in sorted(graph[a]):
            la, lb = layer_of(a), layer_of(b)
            if la is None or lb is None:
                continue
            if la == 'services' and lb != 'services':
                out.append(f'{a} -> {b}: a service imports only services, not {lb}')
            elif lb != 'services' and la != 'services' and rank[lb] > rank[la]:
                out.append(f'{a} -> {b}: {la} imports the higher layer {lb}')
            ma, mb = mode_of(a), mode_of(b)
            if ma and mb and ma != mb:
                out.append(f'{a} -> {b}: the {ma} mode imports the {mb} mode')
    return out


@pytest.fixture(scope='module')
def graph():
    return import_graph(ROOT)


def test_no_import_cycle(graph):
    assert 'diffusion_jax.run' in graph and 'diffusion_jax.samplers.chain' in graph
    assert cycles(graph) == []


def test_every_import_goes_down_the_layers(graph):
    assert violations(graph) == []


def test_the_checker_finds_cycles_and_upward_imports(tmp_path):
    """A planted package: a relative-import cycle inside a function, a core module importing a
    mode, the run layer importing a mode, and evaluation importing the sample-mode driver."""
    files = {
        '__init__.py': '',
        'diffusion.py': 'def f():\n    from . import respace\n',
        'respace.py': 'from diffusion_jax.diffusion import GaussianDiffusion\n',
        'schedules.py': 'import diffusion_jax.train as t\n',
        'run.py': 'def g():\n    from diffusion_jax.evaluation import evaluate\n',
        'generate.py': '',
        'train.py': '',
        'evaluation/__init__.py': '',
        'evaluation/evaluate.py': 'from .. import generate\n',
    }
    for name, text in files.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    planted = import_graph(tmp_path)
    assert cycles(planted) == [['diffusion_jax.diffusion', 'diffusion_jax.respace']]
    found = violations(planted)
    assert ('diffusion_jax.schedules -> diffusion_jax.train: core imports the higher layer modes'
            in found)
    assert ('diffusion_jax.run -> diffusion_jax.evaluation.evaluate: run imports the higher '
            'layer modes' in found)
    assert ('diffusion_jax.evaluation.evaluate -> diffusion_jax.generate: the eval mode imports '
            'the sample mode' in found)
    assert len(found) == 3
