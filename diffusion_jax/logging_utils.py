"""Where a run reports: the log, a log file, TensorBoard events and metrics.jsonl, all inside the
workdir. Only process 0 writes, so a multi-host run produces one copy.

    writer = MetricWriter(workdir)
    writer.scalars(step, {'loss': 0.03, ...})    # log line + TensorBoard + one JSON line
    writer.image(step, 'samples', grid_uint8)    # TensorBoard image
    writer.close()
"""
from __future__ import annotations

import io
import json
import logging as py_logging
import os
import time

import jax
import numpy as np
from absl import logging

from diffusion_jax import image_utils

LOG_FILE = 'train.log'
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
# Libraries whose INFO lines (dozens per checkpoint) would bury the training log.
QUIET_LIBRARIES = ('/orbax/',)
# Their warnings that say only what the package asked for (inference opens checkpoints read
# only): dropped with the INFO lines.
EXPECTED_WARNINGS = ('read_only=True, setting save_interval_steps=0',
                     'Given directory is read only')


# The package's own logger: INFO and above always reach the run's log file, whatever absl's
# verbosity (which is WARNING until absl parses flags, e.g. under pytest or in a notebook).
logger = py_logging.getLogger('diffusion_jax')
logger.setLevel(py_logging.INFO)


class _QuietLibraries(py_logging.Filter):
    """Drops the INFO lines of QUIET_LIBRARIES unless show_library_logs(True) (--verbosity=1);
    clears any progress bar on the console first, so that a log line does not land in the
    middle of one (the bar redraws itself on its next update)."""

    show = False

    def filter(self, record):
        keep = self.show or not any(lib in record.pathname for lib in QUIET_LIBRARIES) or (
            record.levelno >= py_logging.WARNING and not any(
                w in str(record.msg) for w in EXPECTED_WARNINGS))
        if keep:
            for bar in list(_BARS):
                bar.clear()
        return keep


_QUIET = _QuietLibraries()
_BARS: list = []  # the open progress bars (progress_bar) on this process's console


def show_library_logs(show: bool) -> None:
    """Whether the INFO lines of QUIET_LIBRARIES (orbax: dozens per checkpoint save or restore)
    reach the console and the run's log file: False by default, True at --verbosity >= 1 (main).
    Either way the package logs one line per save and per restore (checkpointing)."""
    _QuietLibraries.show = bool(show)


def quiet_libraries() -> None:
    """Drop the INFO lines of QUIET_LIBRARIES from absl's log output (idempotent); main calls
    it before anything runs, MetricWriter again (the library API, notebooks)."""
    logging.get_absl_handler().addFilter(_QUIET)


def in_kernel() -> bool:
    """Whether this runs in a Jupyter kernel (IPython already imported, its shell a kernel's)."""
    import sys  # pylint: disable=import-outside-toplevel
    ipython = sys.modules.get('IPython')  # never imported here: only if already running
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, 'kernel', None) is not None


def progress_bar(total: int, desc: str, *, initial: int = 0, unit: str = 'step'):
    """A tqdm bar on stderr with rate and ETA, on process 0 only (disabled elsewhere, writing
    nothing). initial: where a resumed loop starts, so that the ETA is the remaining
    (total − n) over the rate of this process's own steps. The bar redraws at most once a
    second on a terminal and every 30 s when stderr is a file (a log of a batch job). Close it
    (it is a context manager too). In a Jupyter kernel it is disabled: stderr there is a stream
    the saved notebook keeps line by line, and the notebooks draw their own
    (notebook.TrainProgress)."""
    import sys  # pylint: disable=import-outside-toplevel
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    class _Bar(tqdm):  # leaves _BARS when closed
        def close(self):
            if self in _BARS:
                _BARS.remove(self)
            super().close()

    tty = hasattr(sys.stderr, 'isatty') and sys.stderr.isatty()
    bar = _Bar(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
               disable=jax.process_index() != 0 or in_kernel(), mininterval=1.0 if tty else 30.0,
               dynamic_ncols=tty)
    if not bar.disable:
        _BARS.append(bar)
    return bar


class _RunFile:
    """A text file of the run that grows by appends (metrics.jsonl, train.log).

    Local: each append is written at once (open 'a'). A URI (an object store, where an object
    cannot be appended to): the whole text is kept here and the object rewritten by `flush`,
    at most every `interval` seconds unless forced (MetricWriter forces it at every checkpoint
    and at close), so a long run does not upload its log once per line.
    """

    def __init__(self, path: str, interval: float = 30.0):
        self.path, self.interval = path, interval
        self.remote = image_utils.is_uri(path)
        self._text, self._dirty, self._flushed = None, False, time.monotonic()

    def _load(self) -> list[str]:
        """The file's lines (kept across a resume: the earlier run's rows stay)."""
        if not image_utils.exists(self.path):
            return []
        return image_utils.read_text(self.path).splitlines(keepends=True)

    def drop_rows_from(self, step: int) -> None:
        """Drops the JSON rows of step >= `step` (rewriting the file atomically if any)."""
        lines = [line for line in self._load() if line.strip()]
        keep = [line for line in lines if json.loads(line).get('step', -1) < step]
        if self.remote:
            self._text = ''.join(keep)
            self._dirty = len(keep) < len(lines)
        elif len(keep) < len(lines):
            image_utils.atomic_write(self.path, ''.join(keep).encode())

    def append(self, text: str) -> None:
        if not self.remote:
            with open(self.path, 'a', encoding='utf-8') as f:
                f.write(text)
            return
        if self._text is None:
            self._text = ''.join(self._load())
        self._text += text
        self._dirty = True
        self.flush(force=False)

    def flush(self, force: bool = True) -> None:
        if not (self.remote and self._dirty):
            return
        if force or time.monotonic() - self._flushed >= self.interval:
            image_utils.atomic_write(self.path, self._text.encode())
            self._dirty, self._flushed = False, time.monotonic()


class _RunFileHandler(py_logging.Handler):
    """A logging handler appending to a _RunFile (FileHandler needs a local path)."""

    def __init__(self, run_file: _RunFile):
        super().__init__()
        self.run_file = run_file

    def emit(self, record):
        try:
            self.run_file.append(self.format(record) + '\n')
        except Exception:  # pylint: disable=broad-except  (logging must not raise)
            self.handleError(record)

    def flush(self):
        self.run_file.flush()


class _EpathRecordWriter:
    """TensorBoard event records for a URI logdir (tensorboardX's RecordWriter file object):
    the whole event file is buffered and written in one piece at each flush, as tensorboardX's
    own S3 writer does (object stores cannot append)."""

    def __init__(self, path: str):
        self.path, self.buffer, self.closed = path, io.BytesIO(), False

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        image_utils.atomic_write(self.path, self.buffer.getvalue())

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class _EpathRecordWriterFactory:
    def open(self, path):
        return _EpathRecordWriter(path)

    def directory_check(self, path):  # objects need no folder
        pass


def _summary_writer(logdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    if image_utils.is_uri(logdir):
        # tensorboardX picks a writer by the path's scheme; its own gs:// one needs
        # google-cloud-storage, so event files of any URI go through etils.epath instead.
        from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
        record_writer.register_writer_factory(logdir.split(':', 1)[0],
                                              _EpathRecordWriterFactory())
    return SummaryWriter(logdir)


class MetricWriter:
    """Scalars to the log, TensorBoard (workdir/tensorboard) and workdir/metrics.jsonl.

    metrics.jsonl holds each step once: a resumed run replays the steps after its last
    checkpoint, so the first write drops the rows of that step and later ones (written by the
    interrupted run) before appending. A URI workdir (gs://...) is written through etils.epath:
    metrics.jsonl and train.log are rewritten whole, at most every 30 s and at every `flush`
    (each checkpoint) and `close` (_RunFile).
    """

    def __init__(self, workdir: str, log_file: str = LOG_FILE):
        self.active = jax.process_index() == 0
        self._tb = None
        self._handler = None
        if not self.active:
            return
        workdir = os.fspath(workdir)
        if not image_utils.is_uri(workdir):
            os.makedirs(workdir, exist_ok=True)
        self._tb = _summary_writer(os.path.join(workdir, TENSORBOARD_DIR))
        self._metrics = _RunFile(os.path.join(workdir, METRICS_FILE))
        self._first_write = True
        # One file handler on this package's logger and on absl's (orbax's warnings, etc.).
        log_path = os.path.join(workdir, log_file)
        self._handler = (_RunFileHandler(_RunFile(log_path)) if image_utils.is_uri(log_path)
                         else py_logging.FileHandler(log_path))
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
            self._metrics.drop_rows_from(step)
        self._metrics.append(json.dumps({'step': step, **metrics}) + '\n')

    def image(self, step: int, name: str, image_uint8: np.ndarray) -> None:
        """An [H, W, C] uint8 image (C in {1, 3}) to TensorBoard."""
        if self.active:
            self._tb.add_image(name, np.asarray(image_uint8), step, dataformats='HWC')

    def flush(self) -> None:
        if self.active:
            self._tb.flush()
            self._metrics.flush()
            self._handler.flush()

    def close(self) -> None:
        if not self.active:
            return
        self._tb.close()
        self._metrics.flush()
        for log in (logger, logging.get_absl_logger()):
            log.removeHandler(self._handler)
        self._handler.flush()
        self._handler.close()


def drop_rows_from(path: str, step: int) -> None:
    """Rewrites (atomically) the JSON-lines file at path without its rows of step >= `step`;
    leaves it alone when there are none."""
    run_file = _RunFile(path)
    run_file.drop_rows_from(step)
    run_file.flush()


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
