"""Where a run reports: the log, a log file, TensorBoard events and metrics.jsonl, all inside the
workdir. Only process 0 writes, so a multi-host run produces one copy.

    writer = MetricWriter(workdir)
    writer.scalars(step, {'loss': 0.03, ...})    # log line + TensorBoard + one JSON line
    writer.image(step, 'samples', grid_uint8)    # TensorBoard image
    writer.close()
"""
from __future__ import annotations

import json
import logging as py_logging
import os

import jax
import numpy as np
from absl import logging

LOG_FILE = 'train.log'
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
# Libraries whose INFO lines (dozens per checkpoint) would bury the training log.
QUIET_LIBRARIES = ('/orbax/',)


# The package's own logger: INFO and above always reach the run's log file, whatever absl's
# verbosity (which is WARNING until absl parses flags, e.g. under pytest or in a notebook).
logger = py_logging.getLogger('diffusion_jax')
logger.setLevel(py_logging.INFO)


class _QuietLibraries(py_logging.Filter):
    def filter(self, record):
        return record.levelno >= py_logging.WARNING or not any(
            lib in record.pathname for lib in QUIET_LIBRARIES)


_QUIET = _QuietLibraries()


def quiet_libraries() -> None:
    """Drop the INFO lines of QUIET_LIBRARIES from absl's log output (idempotent)."""
    logging.get_absl_handler().addFilter(_QUIET)


class MetricWriter:
    """Scalars to the log, TensorBoard (workdir/tensorboard) and workdir/metrics.jsonl.

    metrics.jsonl holds each step once: a resumed run replays the steps after its last
    checkpoint, so the first write drops the rows of that step and later ones (written by the
    interrupted run) before appending.
    """

    def __init__(self, workdir: str, log_file: str = LOG_FILE):
        self.active = jax.process_index() == 0
        self._tb = None
        self._handler = None
        if not self.active:
            return
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))
        self._metrics_path = os.path.join(workdir, METRICS_FILE)
        self._first_write = True
        # One file handler on this package's logger and on absl's (orbax's warnings, etc.).
        self._handler = py_logging.FileHandler(os.path.join(workdir, log_file))
        self._handler.setFormatter(py_logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
        self._handler.addFilter(_QUIET)
        quiet_libraries()
        for log in (logger, logging.get_absl_logger()):
            log.addHandler(self._handler)

    def scalars(self, step: int, metrics: dict, note: str = '') -> None:
        """metrics: name -> number; note: extra text for the log line only (e.g. the ETA)."""
        if not self.active:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        logger.info('step %d: %s%s', step, ', '.join(f'{k}={_fmt(v)}' for k, v in metrics.items()),
                     f', {note}' if note else '')
        for name, value in metrics.items():
            self._tb.add_scalar(name, value, step)
        if self._first_write:
            self._first_write = False
            drop_rows_from(self._metrics_path, step)
        with open(self._metrics_path, 'a', encoding='utf-8') as f:
            f.write(json.dumps({'step': step, **metrics}) + '\n')

    def image(self, step: int, name: str, image_uint8: np.ndarray) -> None:
        """An [H, W, C] uint8 image (C in {1, 3}) to TensorBoard."""
        if self.active:
            self._tb.add_image(name, np.asarray(image_uint8), step, dataformats='HWC')

    def flush(self) -> None:
        if self.active:
            self._tb.flush()

    def close(self) -> None:
        if not self.active:
            return
        self._tb.close()
        for log in (logger, logging.get_absl_logger()):
            log.removeHandler(self._handler)
        self._handler.close()


def drop_rows_from(path: str, step: int) -> None:
    """Rewrites (atomically) the JSON-lines file at path without its rows of step >= `step`;
    leaves it alone when there are none."""
    if not os.path.exists(path):
        return
    with open(path, encoding='utf-8') as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if json.loads(line).get('step', -1) < step]
    if len(keep) < len(lines):
        from diffusion_jax import image_utils  # pylint: disable=import-outside-toplevel
        image_utils.atomic_write(path, ''.join(keep).encode())


def _fmt(value: float) -> str:
    return f'{value:.4g}' if abs(value) < 1e5 else f'{value:.3e}'


def format_duration(seconds: float) -> str:
    """1h02m03s style, for the ETA."""
    if not np.isfinite(seconds):
        return '?'
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f'{hours}h{minutes:02d}m{secs:02d}s' if hours else f'{minutes}m{secs:02d}s'


def points_image(points: np.ndarray, size: int = 256, extent: float = 1.5) -> np.ndarray:
    """2-D points [N, 2] -> a [size, size, 1] uint8 scatter plot (white background) covering
    [-extent, extent]², so swiss-roll samples can be looked at like an image grid."""
    image = np.full((size, size), 255, np.uint8)
    pixels = np.round((np.asarray(points)[:, :2] + extent) / (2 * extent) * (size - 1))
    pixels = pixels.astype(np.int64)
    inside = np.all((pixels >= 0) & (pixels < size), axis=1)
    # Row index grows downwards, so y is flipped to draw the usual orientation.
    image[size - 1 - pixels[inside, 1], pixels[inside, 0]] = 0
    return image[..., None]
