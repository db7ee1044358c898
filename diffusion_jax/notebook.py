"""What the notebooks (notebooks/*.ipynb) share: device summary, a progress hook for
`train.train_and_evaluate(..., on_step=...)`, the metrics a run wrote, and image grids.

    progress = notebook.TrainProgress(config, workdir)
    state = train.train_and_evaluate(config, workdir, on_step=progress)
    curve = notebook.read_metrics(workdir)          # {'step': [...], 'loss': [...], ...}
    notebook.show_images(samples, title='DDIM-50')

Presentation only: every number shown comes from the library (the loop's metrics.jsonl, its
sample grids, the samplers). matplotlib, tqdm and IPython are imported lazily, so the module
imports without them; the notebooks need `pip install -e ".[experiments]"` (matplotlib).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from diffusion_jax import image_utils, logging_utils


def device_summary() -> str:
    """'backend: tpu, 1 device(s): TPU v5 lite' style line."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (f'backend: {jax.default_backend()}, {len(devices)} device(s): {", ".join(kinds)}; '
            f'jax {jax.__version__}')


def on_accelerator() -> bool:
    return jax.default_backend() in ('tpu', 'gpu')


def read_metrics(workdir: str) -> dict[str, np.ndarray]:
    """The scalars a run logged (workdir/metrics.jsonl) as name -> [n] arrays; 'step' included.
    A metric missing from some lines is NaN there."""
    path = os.path.join(workdir, logging_utils.METRICS_FILE)
    if not image_utils.exists(path):  # a local path or a URI (gs://...)
        return {}
    rows = [json.loads(line) for line in image_utils.read_text(path).splitlines() if line.strip()]
    names = sorted({k for row in rows for k in row})
    return {k: np.array([row.get(k, np.nan) for row in rows], np.float64) for k in names}


def _display(obj) -> None:
    try:
        from IPython.display import display  # pylint: disable=import-outside-toplevel
    except ImportError:
        return
    display(obj)


def _have_widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return False
    return True


class _DisplayFile:
    """The file a text tqdm bar writes to, shown as one notebook output updated in place
    (IPython's display_id) instead of a stream: the saved notebook keeps one line, the bar's
    last state, where a stream keeps every redraw."""

    def __init__(self):
        self._handle, self._text, self.updates = None, '', 0

    def write(self, text: str) -> None:
        self._text += text

    def flush(self) -> None:
        line = self._text.replace('\n', '\r').split('\r')
        self._text = ''
        line = next((part for part in reversed(line) if part.strip()), '')
        if not line:
            return
        from IPython import display  # pylint: disable=import-outside-toplevel
        bundle = {'text/plain': line.rstrip()}
        if self._handle is None:
            self._handle = display.display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)
        self.updates += 1


def progress_bar(total: int, desc: str, *, initial: int = 0, unit: str = 'step'):
    """A tqdm bar for a notebook: the widget where ipywidgets is installed; in a Jupyter
    kernel without them, tqdm's text bar in one output updated in place (at most once a
    second), so the saved notebook holds one line, not one per step; elsewhere (a console)
    tqdm's text bar on stderr."""
    if logging_utils.in_kernel():
        if _have_widgets():
            from tqdm.notebook import tqdm  # pylint: disable=import-outside-toplevel
            return tqdm(total=total, initial=initial, desc=desc, unit=unit)
        from tqdm import tqdm  # pylint: disable=import-outside-toplevel
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=_DisplayFile(),
                    mininterval=1.0, ncols=100, ascii=False)
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    return tqdm(total=total, initial=initial, desc=desc, unit=unit)


class TrainProgress:
    """on_step hook: a progress bar with the latest logged loss, each sample grid the loop writes
    (samples/<step>/ema_grid.png) shown inline as it appears, and optional kept states.

    keep_every: keep `state` (a copy the loop hands out, safe to keep) every that many steps in
    self.kept[step]; 0 keeps none. The loop writes a grid after calling the hook for its step,
    so a grid shows at the next call (and `finish` shows the last one).
    """

    def __init__(self, config, workdir: str, *, keep_every: int = 0, show_grids: bool = True):
        self.workdir, self.keep_every, self.show_grids = workdir, keep_every, show_grids
        self.total = int(config.training.num_train_steps)
        self.log_every = int(config.training.log_every_steps)
        self.kept: dict[int, Any] = {}
        self._shown: set[int] = set()
        self._bar = None

    def _progress_bar(self, start: int):
        try:
            return progress_bar(self.total, 'train', initial=start)
        except ImportError:  # no tqdm
            return None

    def __call__(self, step: int, state) -> None:
        if self._bar is None:
            self._bar = self._progress_bar(step - 1)
        if self.keep_every and step % self.keep_every == 0:
            self.kept[step] = state
        if self._bar is not None:
            self._bar.update(step - self._bar.n)  # K steps per call: the steps done
            if step % self.log_every == 1 or self.log_every == 1:
                last = read_metrics(self.workdir)
                if 'loss' in last:
                    self._bar.set_postfix(loss=f'{last["loss"][-1]:.4f}',
                                          at=int(last['step'][-1]))
        if self.show_grids:
            self.show_new_grids()

    def show_new_grids(self) -> None:
        folder = image_utils.as_path(os.path.join(self.workdir, 'samples'))
        if not folder.is_dir():
            return
        for name in sorted((p.name for p in folder.iterdir()), key=lambda n: (len(n), n)):
            png = folder / name / 'ema_grid.png'
            if name.isdigit() and int(name) not in self._shown and png.exists():
                self._shown.add(int(name))
                try:
                    from IPython.display import Image  # pylint: disable=import-outside-toplevel
                except ImportError:
                    return
                print(f'EMA samples at step {name}:')
                _display(Image(data=png.read_bytes(), format='png', width=256))

    def finish(self) -> None:
        """Close the bar and show the grid the last step wrote."""
        if self._bar is not None:
            self._bar.close()
        if self.show_grids:
            self.show_new_grids()


def show_images(images, title: str = '', ncols: int | None = None, ax=None):
    """A grid of [N, H, W, C] images in [-1, 1] (or uint8) with matplotlib; returns the axes."""
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = image_utils.to_uint8(images)
    grid = image_utils.make_grid(images, ncols=ncols)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap='gray', vmin=0, vmax=255,
              interpolation='nearest')
    ax.set_title(title)
    ax.axis('off')
    return ax
