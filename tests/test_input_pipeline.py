"""Input pipeline: embedded data, deterministic resumable batches, host slices, mocked tfds, IDX."""
import gzip
import os
import pathlib
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import input_pipeline

try:
    import configs  # noqa: F401
except ImportError:  # configs/ is not on sys.path under plain `pytest`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import celeba64, cifar10, digits, fashion_mnist, imagenet64, lsun, swissroll

FASHION_DIR = '/usr/share/datasets/fashion-mnist'


def test_digits_split_is_fixed_disjoint_and_on_the_8bit_grid():
    data = digits.get_config().data
    train, test = (input_pipeline.get_dataset(data, s) for s in ('train', 'test'))
    assert (len(train), len(test)) == (1438, 359)
    assert train.example_shape == (8, 8, 1) and train.num_classes == 10
    a, b = train.get(np.arange(len(train))), test.get(np.arange(len(test)))
    assert a['image'].dtype == np.float32 and a['label'].dtype == np.int32
    assert a['image'].min() == -1.0 and a['image'].max() == 1.0
    pixels = (a['image'] + 1.0) * 127.5
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-4)
    # No test image appears in the training split; the split does not depend on the run.
    train_rows = {row.tobytes() for row in a['image']}
    assert sum(row.tobytes() in train_rows for row in b['image']) < 5  # sklearn has a few dupes
    again = input_pipeline.get_dataset(data, 'test').get(np.arange(len(test)))
    np.testing.assert_array_equal(again['image'], b['image'])


def test_swissroll_points_lie_in_the_unit_square():
    ds = input_pipeline.get_dataset(swissroll.get_config().data, 'train')
    points = ds.get(np.arange(len(ds)))['image']
    assert points.shape == (10_000, 2)
    assert np.abs(points).max() < 1.2 and points.std() > 0.3


def test_batches_are_a_function_of_seed_and_step_and_reshuffle_each_epoch():
    n, g = 10, 4
    idx = [input_pipeline.batch_indices(n, g, seed=3, step=s) for s in range(5)]
    np.testing.assert_array_equal(idx[2], input_pipeline.batch_indices(n, g, 3, 2))
    flat = np.concatenate(idx)  # 20 positions = two epochs of 10
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert not np.array_equal(flat[:10], flat[10:])
    assert not np.array_equal(idx[0], input_pipeline.batch_indices(n, g, seed=4, step=0))


def test_resumed_iterator_replays_the_same_batches():
    ds = input_pipeline.get_dataset(digits.get_config().data, 'train')
    full = input_pipeline.train_iterator(ds, 16, seed=0, random_flip=True)
    batches = [next(full) for _ in range(5)]
    resumed = input_pipeline.train_iterator(ds, 16, seed=0, start_step=3, random_flip=True)
    for want in batches[3:]:
        got = next(resumed)
        np.testing.assert_array_equal(got['image'], want['image'])
        np.testing.assert_array_equal(got['label'], want['label'])


def test_each_host_reads_its_slice_of_the_global_batch(monkeypatch):
    ds = input_pipeline.get_dataset(digits.get_config().data, 'train')
    whole = next(input_pipeline.train_iterator(ds, 8, seed=1, start_step=7, random_flip=True))
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    parts = []
    for host in range(2):
        monkeypatch.setattr(jax, 'process_index', lambda h=host: h)
        parts.append(next(input_pipeline.train_iterator(ds, 8, 1, 7, random_flip=True)))
    np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]), whole['image'])


def test_random_flip_mirrors_about_half_of_the_images():
    images = np.arange(64 * 4 * 4, dtype=np.float32).reshape(64, 4, 4, 1)
    flipped = input_pipeline._flip(images, 0, 0, 64, slice(0, 64))
    mirrored = [np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, images)]
    unchanged = [np.array_equal(f, i) for f, i in zip(flipped, images)]
    assert all(m or u for m, u in zip(mirrored, unchanged)) and 16 < sum(mirrored) < 48


def test_eval_iterator_covers_the_split_once_with_a_padding_mask():
    ds = input_pipeline.get_dataset(digits.get_config().data, 'test')
    batches = list(input_pipeline.eval_iterator(ds, 100))
    assert len(batches) == 4 and all(b['image'].shape == (100, 8, 8, 1) for b in batches)
    assert sum(int(b['mask'].sum()) for b in batches) == len(ds) == 359
    seen = np.concatenate([b['image'][b['mask']] for b in batches])
    np.testing.assert_array_equal(seen, ds.get(np.arange(len(ds)))['image'])
    assert len(list(input_pipeline.eval_iterator(ds, 100, num_batches=2))) == 2


def test_prefetch_keeps_order_and_raises_the_producers_error():
    def numbers():
        yield from range(5)
        raise RuntimeError('broken source')
    it = input_pipeline.prefetch(numbers())
    assert [next(it) for _ in range(5)] == list(range(5))
    with pytest.raises(RuntimeError, match='broken source'):
        next(it)


@pytest.mark.parametrize('config_module, shape, labelled', [
    (cifar10, (32, 32, 3), True),
    (celeba64, (64, 64, 3), False),  # 218x178 -> centre crop 140 -> 64
    (imagenet64, (64, 64, 3), True),
    (lsun, (256, 256, 3), False),  # variable sizes (mocked) -> shorter side -> 256
])
def test_mocked_tfds_pipeline_yields_shapes_ranges_and_labels(config_module, shape, labelled):
    data = config_module.get_config().data
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = input_pipeline.get_dataset(data, data.train_split)
        batch = next(input_pipeline.train_iterator(ds, 4, seed=0, random_flip=data.random_flip))
    assert len(ds) == 6 and ds.example_shape == shape
    assert batch['image'].shape == (4, *shape) and batch['image'].dtype == np.float32
    assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0
    assert batch['image'].std() > 0.1  # real pixel content, not a constant
    assert batch['label'].dtype == np.int32
    if labelled:
        assert 0 <= batch['label'].min() and batch['label'].max() < data.num_classes
    else:
        assert not batch['label'].any()


def test_unknown_dataset_names_the_field():
    data = cifar10.get_config().data
    data.dataset = 'no_such_dataset'
    with pytest.raises(ValueError, match="data.dataset='no_such_dataset'"):
        input_pipeline.get_dataset(data, 'train')


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
    data = cifar10.get_config().data
    data.dataset, data.data_dir = 'mnist', str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r'data.data_dir=.*tfds build mnist'):
        input_pipeline.get_dataset(data, 'train')
    assert not os.listdir(tmp_path)


def _write_idx(path, array, compress):
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, '>i4').tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, 'wb') as f:
        f.write(payload)


@pytest.mark.parametrize('compress', [False, True])
def test_idx_reader_round_trips(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.arange(5, dtype=np.uint8)
    suffix = '.gz' if compress else ''
    _write_idx(tmp_path / f't10k-images-idx3-ubyte{suffix}', images, compress)
    _write_idx(tmp_path / f't10k-labels-idx1-ubyte{suffix}', labels, compress)
    data = fashion_mnist.get_config().data
    data.data_dir = str(tmp_path)
    ds = input_pipeline.get_dataset(data, 'test')
    batch = ds.get(np.arange(5))
    np.testing.assert_allclose(batch['image'][..., 0], images / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(batch['label'], labels)


def test_missing_idx_files_name_the_install_command(tmp_path):
    data = fashion_mnist.get_config().data
    data.data_dir = str(tmp_path / 'nowhere')
    with pytest.raises(FileNotFoundError, match=r'data.data_dir=.*apt-get install -y '
                                                r'dataset-fashion-mnist'):
        input_pipeline.get_dataset(data, 'train')


def test_real_fashion_mnist_idx_files():
    # The README's test command installs Debian's dataset-fashion-mnist: real data, not skipped.
    assert os.path.isdir(FASHION_DIR), 'apt-get install -y dataset-fashion-mnist'
    data = fashion_mnist.get_config().data
    data.data_dir = FASHION_DIR
    train, test = (input_pipeline.get_dataset(data, s) for s in ('train', 'test'))
    assert (len(train), len(test)) == (60_000, 10_000)
    labels = train.get(np.arange(len(train)))['label']
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(test.get(np.arange(len(test)))['label']),
                                  np.full(10, 1000))
    batch = test.get(np.arange(256))['image']
    assert batch.shape == (256, 28, 28, 1) and batch.min() == -1.0 and batch.max() == 1.0



def test_parallel_decoding_gives_the_same_batches_and_resumes():
    """data.num_workers threads: batch s is still the same pure function of (seed, s), so a
    run resumed with another worker count reads exactly the batches of an uninterrupted one."""
    data = celeba64.get_config().data  # 218x178 images: crop and PIL resize in every get
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        serial = input_pipeline.get_dataset(data, data.train_split)
        with data.unlocked():
            data.num_workers = 3
        parallel = input_pipeline.get_dataset(data, data.train_split)
        assert parallel.get is not serial.get
        expect = input_pipeline.train_iterator(serial, 5, seed=2, random_flip=True)
        expect = [next(expect) for _ in range(4)]  # 20 positions: crosses an epoch boundary
        resumed = input_pipeline.train_iterator(parallel, 5, seed=2, start_step=2,
                                                random_flip=True)
        for want in expect[2:]:
            got = next(resumed)
            np.testing.assert_array_equal(got['image'], want['image'])
            np.testing.assert_array_equal(got['label'], want['label'])
        whole = parallel.get(np.arange(12))
        np.testing.assert_array_equal(whole['image'], serial.get(np.arange(12))['image'])
        with data.unlocked():
            data.num_workers = -1
        with pytest.raises(ValueError, match='data.num_workers=-1'):
            input_pipeline.get_dataset(data, data.train_split)
