"""The notebooks run top to bottom (papermill, `-p smoke True`), their key results exist in the
kernel and are finite (read by one cell appended to the executed notebook), and they stay
reviewable: each .ipynb is stored without outputs and in sync with its jupytext py:percent twin;
and the state that `train_and_evaluate` hands its on_step hook (how the notebooks show progress)
is safe to keep.
"""
from __future__ import annotations

import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The in-process programs here (a 16-unit MLP) are tiny; the notebooks' kernels are separate
# processes and keep XLA's optimisations (see test_notebook_runs_in_smoke_mode).
pytestmark = pytest.mark.usefixtures('fast_compiles')
ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))


def test_every_notebook_has_a_pair_and_a_parameters_cell():
    import nbformat  # pylint: disable=import-outside-toplevel
    assert len(NOTEBOOKS) >= 3, 'notebooks/01_quickstart, 02_mathematics, 03_guidance expected'
    for path in NOTEBOOKS:
        assert path.with_suffix('.py').exists(), f'{path.name} has no jupytext .py twin'
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
        assert len(tagged) == 1 and 'smoke = False' in tagged[0].source, path.name
        code = [c for c in nb.cells if c.cell_type == 'code']
        assert 'pip install' in code[0].source, f'{path.name}: the first code cell installs'
        assert code[1] is tagged[0], f'{path.name}: parameters right after the install cell'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs_and_in_sync(path):
    import jupytext  # pylint: disable=import-outside-toplevel
    import nbformat  # pylint: disable=import-outside-toplevel
    stored = nbformat.read(path, as_version=4)
    for cell in stored.cells:
        if cell.cell_type == 'code':
            assert not cell.outputs and cell.execution_count is None, (
                f'{path.name} is stored with outputs: clear them '
                f'(jupytext --to ipynb --update {path.with_suffix(".py").name})')
    script = jupytext.read(path.with_suffix('.py'))
    assert [(c.cell_type, c.source) for c in script.cells] == \
           [(c.cell_type, c.source) for c in stored.cells], (
        f'{path.name} and its .py differ: run jupytext --sync {path.with_suffix(".py")}')
    tags = lambda nb: [c.metadata.get('tags', []) for c in nb.cells]  # noqa: E731
    assert tags(script) == tags(stored)


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the notebooks' kernels: programs they share (the digits train
    step of the same smoke sizes) compile once."""
    return tmp_path_factory.mktemp('xla_cache')


# Each notebook's key results: name -> an expression evaluated in the executed notebook's kernel
# by one cell appended after the last (no extra work: the values are already computed).
KEY_OUTPUTS = {
    '01_quickstart': {
        'steps': 'int(state.step)', 'loss': "metrics['loss']", 'samples': 'out',
        'nll': "nll['total_bpd']", 'nll_images': "nll['num_images']"},
    '02_mathematics': {
        'bound': "terms['total']", 'vb': "terms['vb']",
        'bound_minus_parts': "np.asarray(terms['total']) - (np.asarray(terms['prior']) + "
                             "np.asarray(terms['kl_sum']) + np.asarray(terms['decoder']))",
        'reverse_2d': 'frames[-1]', 'progressive': 'prog', 'interp_ddpm': 'ddpm',
        'interp_ddim': 'ddim', 'score': 'score', 'langevin': 'moved'},
    '03_guidance': {'classifier_guided': 'out', 'agreement': 'class_accuracy(out)'},
    '04_pretrained': {
        'ours': 'ours', 'theirs': 'theirs', 'images': 'images',
        'relative_difference': 'np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)'},
}
PROBE_MARK = 'KEY_OUTPUTS '
PROBE = '''import json as _json
import numpy as _np
def _summary(value):
    a = _np.asarray(value, dtype=_np.float64)
    return {'shape': list(a.shape), 'finite': bool(_np.isfinite(a).all()),
            'min': float(a.min()), 'max': float(a.max())}
print(%r + _json.dumps({name: _summary(eval(expr)) for name, expr in %r.items()}))
'''


def _key_outputs(executed) -> dict:
    import json  # pylint: disable=import-outside-toplevel
    text = ''.join(o.get('text', '') for o in executed.cells[-1].outputs)
    line = next(line for line in text.splitlines() if line.startswith(PROBE_MARK))
    return json.loads(line[len(PROBE_MARK):])


def test_key_outputs_cover_every_notebook():
    assert sorted(KEY_OUTPUTS) == sorted(p.stem for p in NOTEBOOKS)


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch, compilation_cache):
    """Runs top to bottom; then every key result exists in the kernel, is finite, and holds what
    the notebook says: its run's steps, the bound equal to the sum of its terms, the converted
    network equal to the PyTorch one."""
    import nbformat  # pylint: disable=import-outside-toplevel
    import papermill  # pylint: disable=import-outside-toplevel
    # The kernel is a fresh process of this interpreter (jupyter_client maps the 'python3'
    # kernelspec's `python` to sys.executable) on one CPU device, as a laptop sees it. XLA's
    # optimisations stay on: unfused, the samplers' 50-step chains ran 30x slower (45 s vs 1.4 s
    # of CPU for classifier guidance), more than the compile time saved.
    monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', '').replace(
        '--xla_force_host_platform_device_count=8', ''))
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(compilation_cache))
    probed = nbformat.read(path, as_version=4)
    probed.cells.append(nbformat.v4.new_code_cell(PROBE % (PROBE_MARK, KEY_OUTPUTS[path.stem])))
    source = tmp_path / 'probed' / path.name
    source.parent.mkdir()
    nbformat.write(probed, source)
    executed = papermill.execute_notebook(
        str(source), str(tmp_path / path.name), parameters={'smoke': True}, kernel_name='python3',
        cwd=str(tmp_path), progress_bar=False, execution_timeout=600)
    # The run landed in the temporary directory, not in the repository.
    assert any((tmp_path / 'runs').iterdir())
    out = _key_outputs(executed)
    assert sorted(out) == sorted(KEY_OUTPUTS[path.stem])
    assert all(v['finite'] for v in out.values()), {k: v for k, v in out.items() if not v['finite']}
    if path.stem == '01_quickstart':  # smoke sizes: 6 steps, 4 samples, one batch of 8 for the NLL
        assert out['steps']['min'] == 6 and out['samples']['shape'] == [4, 8, 8, 1]
        assert out['nll_images']['min'] == 8 and out['nll']['min'] > 0
    elif path.stem == '02_mathematics':
        assert out['bound']['shape'] == [8] and out['bound']['min'] > 0
        assert max(abs(out['bound_minus_parts']['min']), abs(out['bound_minus_parts']['max'])) \
            < 1e-4
    elif path.stem == '03_guidance':  # one sample per class
        assert out['classifier_guided']['shape'] == [10, 8, 8, 1]
        assert 0.0 <= out['agreement']['min'] <= 1.0
    elif path.stem == '04_pretrained':
        assert out['relative_difference']['max'] < 1e-4
        assert out['images']['shape'] == [8, 32, 32, 3]
        assert 0 <= out['images']['min'] and out['images']['max'] <= 255


def _tiny_mlp_config():
    sys.path.insert(0, str(ROOT))
    from configs import swissroll  # pylint: disable=import-outside-toplevel
    config = swissroll.get_config()
    config.model.hidden_dim, config.model.num_layers = 16, 1
    t = config.training
    t.batch_size, t.num_train_steps, t.log_every_steps = 8, 6, 3
    t.checkpoint_every_steps, t.sample_every_steps = 6, 0
    return config


def test_on_step_state_is_safe_to_keep(tmp_path):
    """States kept from steps 1 and 3 stay readable after the run's 6 donated steps, hold the
    values of their own step (not the final ones), and the final kept state is the returned
    one."""
    from diffusion_jax import train  # pylint: disable=import-outside-toplevel
    kept = {}
    final = train.train_and_evaluate(_tiny_mlp_config(), str(tmp_path / 'run'),
                                     on_step=lambda step, state: kept.setdefault(step, state))
    assert sorted(kept) == [1, 2, 3, 4, 5, 6]
    for step, state in kept.items():
        assert int(state.step) == step  # readable: a donated buffer would raise here
        leaves = jax.tree.leaves(state.params)
        assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    first = jax.tree.leaves(kept[1].params)
    last = jax.tree.leaves(final.params)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, last))
    for a, b in zip(jax.tree.leaves(kept[6]), jax.tree.leaves(final)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_without_the_snapshot_a_kept_state_is_deleted(tmp_path, monkeypatch):
    """The control: handing out the loop's own state, the next step's donation deletes it."""
    from diffusion_jax import train  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(train, 'snapshot', lambda state: state)
    kept = {}
    train.train_and_evaluate(_tiny_mlp_config(), str(tmp_path / 'run'),
                             on_step=lambda step, state: kept.setdefault(step, state))
    assert all(x.is_deleted() for x in jax.tree.leaves(kept[1].params))
    assert not any(x.is_deleted() for x in jax.tree.leaves(kept[6].params))


def test_snapshot_copies_into_fresh_buffers():
    from diffusion_jax import train  # pylint: disable=import-outside-toplevel
    tree = {'a': jnp.arange(4.0), 'b': {'c': jnp.ones((2, 3), jnp.int32)}}
    copy = train.snapshot(tree)
    donate = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)
    donate(tree)
    np.testing.assert_array_equal(copy['a'], np.arange(4.0))
    np.testing.assert_array_equal(copy['b']['c'], np.ones((2, 3), np.int32))
