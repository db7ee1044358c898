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
            from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
        except ImportError:
            return None
        return tqdm(total=self.total, initial=start, desc='train', unit='step')

    def __call__(self, step: int, state) -> None:
        if self._bar is None:
            self._bar = self._progress_bar(step - 1)
        if self.keep_every and step % self.keep_every == 0:
            self.kept[step] = state
        if self._bar is not None:
            self._bar.update(1)
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
