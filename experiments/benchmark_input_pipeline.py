"""Input pipeline throughput: host images/s of train_iterator (read, decode, crop/resize,
scale, flip) with 0 (the calling thread), 1, 2, … decoding threads (data.num_workers).

    python experiments/benchmark_input_pipeline.py --config=configs/cifar10.py --workers=0,1,2
    python experiments/benchmark_input_pipeline.py --config=configs/lsun.py --batch=32 --mock
    python experiments/benchmark_input_pipeline.py --config=configs/fashion_mnist.py \
        --override=source=idx,data_dir=/usr/share/datasets/fashion-mnist

With --mock the tfds source is tfds.testing.mock_data (random examples of the dataset's
features: no files needed, and no array_record reads measured; the examples are generated in
Python on access, which counts against the pipeline). Without it the prepared tfds files
(or IDX files) are read. The first --warmup batches are not timed. Prints one JSON line per
worker count: images/s and images/s per host core used (max(1, workers)).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from diffusion_jax import input_pipeline  # noqa: E402
from experiments.benchmark_train import load_config  # noqa: E402  pylint: disable=wrong-import-position


def rate(data_config, batch: int, batches: int, warmup: int, mock: bool) -> float:
    context = contextlib.nullcontext()
    if mock:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
        context = tfds.testing.mock_data(num_examples=max(4 * batch, 512),
                                         policy=tfds.testing.MockPolicy.USE_CODE)
    with context:
        ds = input_pipeline.get_dataset(data_config, data_config.train_split)
        it = input_pipeline.train_iterator(ds, batch, seed=0, random_flip=data_config.random_flip)
        for _ in range(warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * batch / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default='configs/cifar10.py')
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--batches', type=int, default=10, help='timed batches')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--workers', default='0,1,2')
    parser.add_argument('--mock', action='store_true', help='tfds.testing.mock_data examples')
    parser.add_argument('--override', default='', help='data fields, e.g. source=idx,data_dir=D')
    args = parser.parse_args()
    config = load_config(args.config)
    with config.data.unlocked():
        for item in filter(None, args.override.split(',')):
            key, value = item.split('=', 1)
            config.data[key] = type(config.data[key])(value)
    for workers in (int(w) for w in args.workers.split(',')):
        with config.data.unlocked():
            config.data.num_workers = workers
        images_per_s = rate(config.data, args.batch, args.batches, args.warmup, args.mock)
        print(json.dumps(dict(
            dataset=config.data.dataset, source=config.data.source, mock=args.mock,
            image_size=config.data.image_size, batch=args.batch, workers=workers,
            images_per_s=images_per_s, images_per_s_per_core=images_per_s / max(1, workers),
            host_cores=os.cpu_count())), flush=True)


if __name__ == '__main__':
    main()
