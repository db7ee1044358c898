"""Datasets behind one interface: random access to examples, deterministic batches per step.

Every source, embedded or tfds, becomes a `Dataset`: `len(ds)` examples of one split and
`ds.get(indices) -> dict(image=float32 [n, ...] in [-1, 1], label=int32 [n])`. Images are NHWC
(the swiss roll's "images" are [n, 2] points). Sources, chosen by config.data:

  digits        scikit-learn's 1,797 8x8 handwritten digits (embedded, offline). Pixels 0..16 go
                to the 8-bit grid, round(v·255/16), then to [-1, 1]. The split is a
                permutation seeded by data.split_seed: the first 80% train, the last 20%
                test, the same on every machine and run.
  digit_pairs   two digits side by side, [8, 16, 1], captioned "<left> and <right>" (e.g.
                "three and seven"), label 10·left + right. The 100 ordered pairs are permuted
                by data.split_seed: the first 80 are the training pairs, the last 20 held out
                (`pair_split`). The 'train' split's data.num_train_examples examples use
                training pairs and the digits' train images; 'test' (num_test_examples) the
                held-out pairs and the digits' test images; each example's pair and its two
                images are drawn by a generator seeded by (split_seed, split): deterministic.
  swissroll     sklearn.datasets.make_swiss_roll's (x, z) plane, divided by the roll's largest
                radius 4.5π so the points lie in [-1, 1]; train and test use different seeds.
  idx           the original IDX files of (Fashion-)MNIST under data.data_dir, gzipped or not
                (Debian: `apt-get install -y dataset-fashion-mnist`).
  tfds          tfds.data_source (array_record random access, no TensorFlow needed to read),
                centre-cropped (data.crop_size, or the shorter side) and resized to image_size.

Batches are a pure function of (seed, step): the global example positions of step s are
s·G … s·G+G-1, position p reads example perm_{p // N}[p mod N] where perm_e is epoch e's
permutation seeded by (seed, e). So every epoch is reshuffled, a resumed run reads exactly the
batches an uninterrupted one would, and each host reads only its slice
[process_index·L, (process_index+1)·L) of the global batch (L = G / process_count).

Decoding runs beside the train step: `prefetch` prepares batches in a background thread, and
data.num_workers > 1 splits each batch over that many decoding threads (`parallel_get`), which
changes the speed and nothing else.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gzip
import math
import os
import queue
import threading
from typing import Callable, Iterator

import jax
import numpy as np

EMBEDDED = ('digits', 'swissroll', 'digit_pairs')
# The captions' words for the digits 0-9 (digit_pairs: "three and seven" = 3 left, 7 right).
DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
NUM_PAIRS = 100  # ordered pairs (left, right) of digits
NUM_HELD_OUT_PAIRS = 20  # pairs never shown in training: following them needs composition
SOURCES = ('embedded', 'idx', 'tfds')
# The IDX file names of (Fashion-)MNIST, as published and as Debian installs them.
IDX_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
             'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
FASHION_MNIST_APT = 'apt-get update && apt-get install -y dataset-fashion-mnist'
# make_swiss_roll draws t in [1.5π, 4.5π] and returns (t cos t, ·, t sin t): |x|, |z| ≤ 4.5π.
SWISSROLL_RADIUS = 4.5 * math.pi
# Seed offset of the swiss roll's test points, so they never repeat the training points.
_SWISSROLL_TEST_SEED_OFFSET = 1


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Random access to the examples of one split.

    get(indices [n] int) -> dict(image=float32 [n, *example_shape] in [-1, 1], label=int32 [n]).
    captions: one caption per example (a captioned dataset: digit_pairs), else None.
    """
    name: str
    split: str
    num_examples: int
    example_shape: tuple[int, ...]
    num_classes: int
    get: Callable[[np.ndarray], dict]
    captions: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return self.num_examples


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
def _in_memory(name, split, images, labels, num_classes) -> Dataset:
    images = np.ascontiguousarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    return Dataset(name, split, len(images), tuple(images.shape[1:]), num_classes,
                   lambda idx: dict(image=images[idx], label=labels[idx]))


def _digits(data_config, split: str) -> Dataset:
    from sklearn import datasets  # pylint: disable=import-outside-toplevel
    digits = datasets.load_digits()
    # Pixels count the set bits (0..16) of 4x4 blocks of a 32x32 bitmap; putting them on the
    # 8-bit grid keeps bits/dim comparable with other image data.
    pixels = np.round(digits.images[..., None] * (255.0 / 16.0))
    images = pixels.astype(np.float32) / 127.5 - 1.0
    perm = np.random.default_rng(data_config.split_seed).permutation(len(images))
    n_test = int(round(len(images) * data_config.test_fraction))
    keep = perm[:len(images) - n_test] if split == 'train' else perm[len(images) - n_test:]
    return _in_memory('digits', split, images[keep], digits.target[keep], 10)


def pair_split(split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training pairs [80], held-out pairs [20]) of digit_pairs as ids 10·left + right."""
    perm = np.random.default_rng([split_seed, NUM_PAIRS]).permutation(NUM_PAIRS)
    return (np.sort(perm[:NUM_PAIRS - NUM_HELD_OUT_PAIRS]),
            np.sort(perm[NUM_PAIRS - NUM_HELD_OUT_PAIRS:]))


def pair_caption(pair: int) -> str:
    """The caption of pair id 10·left + right: '<left> and <right>'."""
    return f'{DIGIT_WORDS[pair // 10]} and {DIGIT_WORDS[pair % 10]}'


def _digit_pairs(data_config, split: str) -> Dataset:
    digits = _digits(data_config, split)  # the same 80/20 split of the scans as 'digits'
    images, labels = (digits.get(np.arange(len(digits)))[k] for k in ('image', 'label'))
    train_pairs, held_out = pair_split(data_config.split_seed)
    pairs_of_split = train_pairs if split == 'train' else held_out
    n = int(data_config.num_train_examples if split == 'train' else data_config.num_test_examples)
    rng = np.random.default_rng([data_config.split_seed, 0 if split == 'train' else 1])
    pairs = pairs_of_split[rng.integers(0, len(pairs_of_split), n)]
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    pick = lambda classes: np.array([by_class[c][rng.integers(len(by_class[c]))]
                                     for c in classes])
    left, right = pick(pairs // 10), pick(pairs % 10)
    pair_images = np.concatenate([images[left], images[right]], axis=2)  # [n, 8, 16, 1]
    captions = tuple(pair_caption(int(p)) for p in pairs)
    ds = _in_memory('digit_pairs', split, pair_images, pairs, NUM_PAIRS)
    return dataclasses.replace(ds, captions=captions)


def _swissroll(data_config, split: str) -> Dataset:
    from sklearn import datasets  # pylint: disable=import-outside-toplevel
    n = data_config.num_train_examples if split == 'train' else data_config.num_test_examples
    seed = data_config.split_seed + (0 if split == 'train' else _SWISSROLL_TEST_SEED_OFFSET)
    points, _ = datasets.make_swiss_roll(n, noise=data_config.swissroll_noise, random_state=seed)
    points = points[:, [0, 2]] / SWISSROLL_RADIUS
    return _in_memory('swissroll', split, points, np.zeros(n, np.int32), 0)


def _find_idx_file(data_dir: str, stem: str, data_config) -> str:
    for candidate in (stem, stem + '.gz'):
        path = os.path.join(data_dir, candidate)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f'data.data_dir={data_dir!r} has no {stem}[.gz] for data.dataset='
        f'{data_config.dataset!r} (data.source=\'idx\'): install the files with '
        f'`{FASHION_MNIST_APT}` (Fashion-MNIST, into /usr/share/datasets/fashion-mnist), point '
        "data.data_dir at them, or set data.source='tfds' with a prepared tfds dataset.")


def read_idx(path: str) -> np.ndarray:
    """One IDX file (gzipped or not) -> numpy array: magic 0x00 0x00 dtype ndim, big-endian
    int32 dims, then the data. (Fashion-)MNIST files hold uint8 (dtype code 0x08)."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    if data[:2] != b'\x00\x00' or data[2] != 0x08:
        raise ValueError(f'{path} is not an unsigned-byte IDX file (magic {data[:4].hex()}).')
    ndim = data[3]
    dims = np.frombuffer(data, '>i4', count=ndim, offset=4).astype(np.int64)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(tuple(dims))


def _idx(data_config, split: str) -> Dataset:
    if split not in IDX_FILES:
        raise ValueError(f"split {split!r} is not an IDX split: use 'train' or 'test'.")
    image_file, label_file = (_find_idx_file(data_config.data_dir, stem, data_config)
                              for stem in IDX_FILES[split])
    images = read_idx(image_file)[..., None]
    labels = read_idx(label_file).astype(np.int32)
    # Kept as uint8 (47 MB for Fashion-MNIST's train split) and scaled per batch.
    return Dataset(data_config.dataset, split, len(images), _shape(data_config),
                   data_config.num_classes,
                   lambda idx: dict(image=_prepare_images(images[idx], data_config),
                                    label=labels[idx]))


def _shape(data_config) -> tuple[int, int, int]:
    return (data_config.image_size, data_config.image_size, data_config.channels)


def _center_crop_resize(image: np.ndarray, size: int, crop: int) -> np.ndarray:
    """Square centre crop (side `crop`, or the shorter side when 0), then a resize to `size`."""
    h, w = image.shape[:2]
    side = min(crop or min(h, w), h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top:top + side, left:left + side]
    if side != size:
        from PIL import Image  # pylint: disable=import-outside-toplevel
        squeeze = image.shape[-1] == 1
        pil = Image.fromarray(image[..., 0] if squeeze else image)
        # BICUBIC with PIL's antialiasing when shrinking, as ADM/improved DDPM prepare data.
        image = np.asarray(pil.resize((size, size), Image.BICUBIC))
        image = image[..., None] if squeeze else image
    return image


def _prepare_images(images: np.ndarray, data_config) -> np.ndarray:
    """uint8 [n, h, w, c] (or a list of differently sized images) -> float32 [n, S, S, C]."""
    size, crop = data_config.image_size, data_config.crop_size
    if isinstance(images, np.ndarray) and images.shape[1:] == _shape(data_config) and not crop:
        return images.astype(np.float32) / 127.5 - 1.0
    out = []
    for image in images:
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[:2] != (size, size) or crop:
            image = _center_crop_resize(image, size, crop)
        if image.shape[-1] != data_config.channels:
            raise ValueError(f'data.channels={data_config.channels} but {data_config.dataset} '
                             f'images have {image.shape[-1]} channels: set data.channels to it.')
        out.append(image)
    return np.stack(out).astype(np.float32) / 127.5 - 1.0


def _tfds_error(data_config, split: str, err: Exception) -> Exception:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    name = data_config.dataset
    try:
        tfds.builder_cls(name.split('/')[0])
    except Exception:  # pylint: disable=broad-except
        return ValueError(f'data.dataset={name!r} is not a known dataset: use one of '
                          f"{', '.join(EMBEDDED)}, an IDX dataset with data.source='idx', or a "
                          'tfds name (tfds.list_builders()).')
    where = data_config.data_dir or '~/tensorflow_datasets'
    reason = (str(err).splitlines() or [''])[0][:200]
    offline = (f" Offline, the IDX files serve too: `{FASHION_MNIST_APT}` and data.source='idx'."
               if name == 'fashion_mnist' else '')
    return FileNotFoundError(
        f'data.dataset={name!r} split {split!r} is not prepared (array_record) under '
        f'data.data_dir={where!r} ({type(err).__name__}: {reason}). '
        f'Prepare it once with TensorFlow: `pip install diffusion_jax[tf] && tfds build {name} '
        f'--file_format=array_record --data_dir={where}`, or set data.download=True when this '
        f'machine has internet and TensorFlow.{offline}')


def _tfds(data_config, split: str) -> Dataset:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    kwargs = dict(split=split, data_dir=data_config.data_dir or None,
                  download=bool(data_config.download))
    if data_config.download:
        # Random access needs array_record files; tfds prepares tfrecord by default.
        kwargs['builder_kwargs'] = dict(file_format='array_record')
    try:
        source = tfds.data_source(data_config.dataset, **kwargs)
        num_examples = len(source)
    except Exception as err:  # pylint: disable=broad-except
        raise _tfds_error(data_config, split, err) from err
    has_labels = data_config.num_classes > 0

    def get(idx):
        keys = [int(i) for i in idx]
        try:  # one batched array_record read
            examples = source.__getitems__(keys)
        except TypeError:  # tfds.testing.mock_data's source has no working __getitems__
            examples = [source[k] for k in keys]
        labels = [int(ex['label']) if has_labels else 0 for ex in examples]
        return dict(image=_prepare_images([ex['image'] for ex in examples], data_config),
                    label=np.asarray(labels, np.int32))

    return Dataset(data_config.dataset, split, num_examples, _shape(data_config),
                   data_config.num_classes, get)


def source_of(data_config) -> str:
    """'embedded' | 'idx' | 'tfds', checked against the dataset name."""
    if data_config.dataset in EMBEDDED:
        return 'embedded'
    if data_config.source == 'embedded':
        raise ValueError(f'data.dataset={data_config.dataset!r} is not an embedded dataset '
                         f'({", ".join(EMBEDDED)}): use one of them, or a tfds name with '
                         "data.source='tfds'.")
    if data_config.source not in ('idx', 'tfds'):
        raise ValueError(f"data.source={data_config.source!r} is not valid for "
                         f"data.dataset={data_config.dataset!r}: use 'idx' or 'tfds'.")
    return data_config.source


def get_dataset(data_config, split: str) -> Dataset:
    """The split ('train', 'test', or a tfds split name) of the dataset config.data names.

    data.num_workers > 1 reads and decodes the examples of each `get` in that many threads
    (`parallel_get`); the result is the same array either way.
    """
    source = source_of(data_config)
    if source == 'embedded':
        if split not in ('train', 'test'):
            raise ValueError(f"split {split!r} of {data_config.dataset}: use 'train' or 'test'.")
        return {'digits': _digits, 'swissroll': _swissroll,
                'digit_pairs': _digit_pairs}[data_config.dataset](data_config, split)
    ds = (_idx if source == 'idx' else _tfds)(data_config, split)
    num_workers = int(data_config.get('num_workers', 0) or 0)
    if num_workers < 0:
        raise ValueError(f'data.num_workers={num_workers} is negative: use 0 (decode in the '
                         'calling thread) or the number of decoding threads.')
    if num_workers > 1:
        ds = dataclasses.replace(ds, get=parallel_get(ds.get, num_workers))
    return ds


def parallel_get(get: Callable[[np.ndarray], dict], num_workers: int
                 ) -> Callable[[np.ndarray], dict]:
    """`get` over num_workers contiguous chunks of the indices in a thread pool, concatenated
    in order: the same batch as get(indices), so batch s stays a pure function of (seed, s).

    Threads, not processes: the work of a batch is array_record reads, PNG/JPEG decoding and
    PIL resizing, which run in C with the GIL released, and threads share the open source.
    """
    pool = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix='decode')

    def get_parallel(indices):
        indices = np.asarray(indices)
        chunks = [c for c in np.array_split(indices, num_workers) if len(c)]
        if len(chunks) < 2:
            return get(indices)
        parts = list(pool.map(get, chunks))
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    return get_parallel


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, global_batch_size: int, seed: int, step: int) -> np.ndarray:
    """Example indices [G] of the global batch at `step`; a pure function of its arguments."""
    positions = step * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_examples)
    out = np.empty(global_batch_size, np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = _epoch_permutation(num_examples, seed, int(epoch))[offsets[sel]]
    return out


def _host_slice(global_batch_size: int) -> slice:
    if global_batch_size % jax.process_count():
        raise ValueError(f'training.batch_size={global_batch_size} is not divisible by the '
                         f'{jax.process_count()} hosts: use a multiple of it.')
    local = global_batch_size // jax.process_count()
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


def _flip(images: np.ndarray, seed: int, step: int, global_batch_size: int,
          host: slice) -> np.ndarray:
    """Horizontal flip with probability ½, decided per global position from (seed, step), so
    the flips do not depend on the number of hosts."""
    flips = np.random.default_rng([seed, step, 1]).random(global_batch_size)[host] < 0.5
    return np.where(flips[:, None, None, None], images[:, :, ::-1], images)


def train_iterator(ds: Dataset, global_batch_size: int, seed: int, start_step: int = 0,
                   random_flip: bool = False) -> Iterator[dict]:
    """Endless host-local batches for steps start_step, start_step + 1, …"""
    host = _host_slice(global_batch_size)
    step = start_step
    while True:
        batch = ds.get(batch_indices(len(ds), global_batch_size, seed, step)[host])
        if random_flip:
            batch['image'] = _flip(batch['image'], seed, step, global_batch_size, host)
        yield batch
        step += 1


def eval_iterator(ds: Dataset, global_batch_size: int, num_batches: int | None = None
                  ) -> Iterator[dict]:
    """The split in order, once: host-local batches with mask (bool [L]) False on the padding
    that fills the last batch to full size (so a jitted eval step compiles once)."""
    host = _host_slice(global_batch_size)
    total = math.ceil(len(ds) / global_batch_size)
    for b in range(total if num_batches is None else min(num_batches, total)):
        positions = (b * global_batch_size + np.arange(global_batch_size))[host]
        mask = positions < len(ds)
        batch = ds.get(np.where(mask, positions, 0))
        batch['mask'] = mask
        yield batch


def stack_batches(iterator: Iterator[dict], k: int) -> Iterator[dict]:
    """Groups k consecutive batches into one with a new leading axis: {key: [k, B, ...]}, the
    input of k train steps in one call (training.steps_per_call). k = 1 passes batches through
    unchanged (no extra axis)."""
    if k == 1:
        yield from iterator
        return
    while True:
        group = [next(iterator) for _ in range(k)]
        yield {key: np.stack([b[key] for b in group]) for key in group[0]}


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
    """Runs `iterator` in a daemon thread, `size` items ahead (decoding overlaps the step).

    Closing the returned generator (or dropping it) stops the thread at its next item.
    """
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def worker():
        try:
            for item in iterator:
                if not put(item):
                    return
        except BaseException as err:  # pylint: disable=broad-except
            put(err)
        put(done)

    threading.Thread(target=worker, daemon=True).start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
