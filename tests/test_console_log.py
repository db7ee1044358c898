"""What a run prints: one line per checkpoint save/restore (orbax's dozens only at --verbosity=1),
progress bars with the right total and ETA on process 0, and a notebook bar that does not write a
line per step into a saved notebook when ipywidgets is missing."""
import logging as py_logging
import sys
import types

import jax
import pytest
import tqdm.std
from absl import logging

from diffusion_jax import logging_utils, main, notebook, run as run_lib

pytestmark = pytest.mark.usefixtures('fast_compiles')


@pytest.fixture
def console(monkeypatch):
    """The records absl's stderr handler (the CLI's console, as app.run installs it) prints."""
    handler = logging.get_absl_handler()
    printed = []
    original = handler.handle

    def handle(record):
        shown = original(record)
        if shown:
            printed.append(record)
        return shown

    monkeypatch.setattr(handler, 'handle', handle)
    py_logging.root.addHandler(handler)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.INFO)  # the CLI's default (--verbosity=0)
    yield printed
    logging.set_verbosity(verbosity)
    py_logging.root.removeHandler(handler)
    logging_utils.show_library_logs(False)


def _new_process():
    """As a fresh CLI process: no filter left on the console by an earlier command."""
    handler = logging.get_absl_handler()
    for f in list(handler.filters):
        handler.removeFilter(f)


def _config(steps):
    from configs import model_configs, swissroll
    config = swissroll.get_config()
    config.model = model_configs.swissroll_mlp(hidden_dim=16, num_layers=1)
    config.diffusion.num_timesteps = 20
    t = config.training
    t.batch_size, t.num_train_steps = 64, steps
    t.log_every_steps = t.checkpoint_every_steps = 2
    t.sample_every_steps = 0
    config.compile_cache_dir = ''
    return config


def _orbax_info(records):
    return [r for r in records if '/orbax/' in r.pathname and r.levelno < py_logging.WARNING]


def _ours(records, text):
    return [r.getMessage() for r in records if r.getMessage().startswith(text)]


def test_one_line_per_save_and_restore_and_orbax_at_verbosity_1(console, tmp_path,
                                                                 monkeypatch):
    bars = []

    def recording_bar(*args, **kwargs):
        bars.append(make_bar(*args, **kwargs))
        return bars[-1]

    make_bar = getattr(logging_utils, 'progress_bar', None)
    monkeypatch.setattr(logging_utils, 'progress_bar', recording_bar, raising=False)
    workdir = str(tmp_path / 'run')
    _new_process()
    main.execute(_config(4), workdir, 'train', {})  # saves 2 and 4
    _new_process()
    main.execute(_config(6), workdir, 'train', {})  # restores 4, saves 6
    _new_process()
    typed = {'sampling.num_samples': 8, 'sampling.batch_size': 8}
    main.execute(run_lib.get_config(workdir), workdir, 'sample', typed)  # restores 6
    # 3 saves and 2 restores: one line each of ours, and none of orbax's dozens (the bound is
    # one per save/restore; the filter leaves none).
    assert [r.getMessage()[:80] for r in _orbax_info(console)] == []
    saved = _ours(console, 'saved checkpoint step ')
    assert [m.split()[3] for m in saved] == ['2', '4', '6']
    resumed = _ours(console, 'resumed from ')  # training's restore
    assert len(resumed) == 1 and resumed[0].endswith(' at step 4')
    restored = _ours(console, 'restored ')  # sample's (and eval's)
    assert len(restored) == 1 and ' step 6 ' in restored[0]
    assert not [r for r in console if '/orbax/' in r.pathname and 'read only' in r.getMessage()]

    # The bars: training from 0 and from the resumed step to num_train_steps, sampling's batches
    # (n advanced: a disabled bar, as on a process other than 0, does not count).
    train_bars = [b for b in bars if b.desc == 'train']
    assert [(b.total, b.initial, b.n) for b in train_bars] == [(4, 0, 4), (6, 4, 6)]
    assert [(b.total, b.n) for b in bars if b.desc == 'sample'] == [(1, 1)]

    # --verbosity=1: orbax's detail is back.
    del console[:]
    _new_process()
    main.execute(run_lib.get_config(workdir), workdir, 'sample', typed, verbosity=1)
    assert len(_orbax_info(console)) >= 10
    assert len(_ours(console, 'restored ')) == 1


def test_progress_bar_eta_counts_this_process_steps_and_only_process_0_draws(monkeypatch,
                                                                               capsys):
    clock = [1000.0]
    monkeypatch.setattr(tqdm.std, 'time', lambda: clock[0])
    bar = logging_utils.progress_bar(100, 'train', initial=20)
    clock[0] += 10.0
    bar.update(10)  # 10 steps in 10 s after resuming at 20: 70 left at 1 step/s
    assert '30/100' in str(bar) and '[00:10<01:10,' in str(bar)
    bar.close()
    assert '30/100' in capsys.readouterr().err

    monkeypatch.setattr(jax, 'process_index', lambda: 1)
    other = logging_utils.progress_bar(100, 'train')
    other.update(50)
    other.close()
    assert other.disable and capsys.readouterr().err == ''


class _Notebook:
    """A Jupyter kernel without ipywidgets, as the saved notebook sees it: display() adds an
    output, a display handle's update() replaces it in place (as nbclient stores
    update_display_data), and every line written to stdout/stderr is a stream line."""

    def __init__(self, monkeypatch):
        self.outputs = []
        shell = types.SimpleNamespace(kernel=object())
        ipython = types.ModuleType('IPython')
        ipython.get_ipython = lambda: shell
        display = types.ModuleType('IPython.display')
        display.display = self.display
        ipython.display = display
        monkeypatch.setitem(sys.modules, 'IPython', ipython)
        monkeypatch.setitem(sys.modules, 'IPython.display', display)
        monkeypatch.setitem(sys.modules, 'ipywidgets', None)  # import ipywidgets fails

    def display(self, obj, raw=False, display_id=None):
        index = len(self.outputs)
        self.outputs.append(obj)
        notebook_outputs = self.outputs

        class Handle:
            def update(self, new, raw=False):
                notebook_outputs[index] = new

        return Handle() if display_id else None


def test_notebook_bar_without_ipywidgets_updates_one_output_in_place(monkeypatch, capfd,
                                                                      tmp_path):
    fake = _Notebook(monkeypatch)
    clock = [1000.0]
    monkeypatch.setattr(tqdm.std, 'time', lambda: clock[0])
    steps = 500
    progress = notebook.TrainProgress(_config(steps), str(tmp_path), show_grids=False)
    for step in range(1, steps + 1):
        clock[0] += 1.0  # a step a second: a stream bar would redraw every step
        progress(step, None)
    progress.finish()
    stream = capfd.readouterr()
    lines = [part for part in (stream.out + stream.err).replace('\r', '\n').split('\n')
             if part.strip()]
    assert lines == [] and len(fake.outputs) == 1
    assert f'{steps}/{steps}' in fake.outputs[0]['text/plain']


def test_notebook_bar_in_a_real_kernel_leaves_one_output(tmp_path):
    """The same in a Jupyter kernel (ipykernel through nbclient, as the notebook tests run),
    ipywidgets made unimportable there: the saved cell holds one output, the bar's last state
    (measured before this fix: 303 stream outputs for 300 steps)."""
    import nbclient
    import nbformat
    root = str(__import__('pathlib').Path(__file__).resolve().parents[1])
    code = f'''
import sys
sys.path.insert(0, {root!r})
sys.modules['ipywidgets'] = None
import ml_collections, tqdm.std
clock = [1000.0]
tqdm.std.time = lambda: clock[0]  # a step a second
from diffusion_jax import notebook
config = ml_collections.ConfigDict(
    {{'training': {{'num_train_steps': 300, 'log_every_steps': 10}}}})
progress = notebook.TrainProgress(config, {str(tmp_path)!r}, show_grids=False)
for step in range(1, 301):
    clock[0] += 1.0
    progress(step, None)
progress.finish()
'''
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nbclient.NotebookClient(nb, timeout=120, kernel_name='python3').execute()
    outputs = nb.cells[0].outputs
    assert [o.output_type for o in outputs] == ['display_data']
    assert '300/300' in outputs[0]['data']['text/plain']
