"""Sample quality of a run: FID, Inception Score and precision/recall of generated samples.

    FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2(Σ_r Σ_g)^{1/2})      (Heusel et al. 2017)
    IS  = exp(E_x KL(p(y|x) ‖ p(y)))                             (Salimans et al. 2016), 10 splits
    precision/recall: Kynkäänniemi et al. 2019 with k = 3 nearest neighbours.

Features come from one of two spaces (config.eval.feature_space):
  'inception'    the FID InceptionV3 (pool 2048-d, logits 1008), weights from
                 config.eval.inception_weights (see diffusion_jax.evaluation.inception): the numbers
                 compare with published ones when the protocol matches (50,000 samples against the
                 training set's statistics).
  'feature_net'  a small classifier trained on the dataset itself (python -m
                 diffusion_jax.evaluation.feature_net --dataset=... --out=DIR; config.eval.
                 feature_net_dir). The practice of MNIST-scale papers; NOT comparable with
                 Inception FID.
The reference statistics of (dataset, split, feature space) are computed once and cached in
config.eval.reference_dir (default workdir/eval) as .npz, with up to num_samples real features kept
for precision/recall.

The report (eval/samples_<step>.json and one log line) states what the numbers were computed
from: the sample count, the reference set and its size, the feature space and its weights' hash,
the sampler with its steps and η, the guidance settings and EMA or not (sampler_fields,
reference_fields); fewer than PROTOCOL_SAMPLES = 50,000 samples in Inception space add a warning
to the log and to the JSON's 'warnings'.

Streaming: samples arrive as uint8 batches (samplers.batches.sample_batches, or batches read from an
.npz), each batch's features go into float64 running statistics (fid.RunningStats) and only
the features themselves are kept (for precision/recall and IS), so host memory is O(N·D) for
D-dim features, never O(N·H·W·C) for the pixels. `evaluate_samples_file` scores an existing
samples.npz (eval.samples_path) the same way without loading a model.
"""
from __future__ import annotations

import os
import zipfile
from typing import Iterable, Iterator

import jax
import numpy as np
from absl import logging

from diffusion_jax import image_utils, latents, run
from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation.fid import FEATURE_SPACES  # noqa: F401  (the old name)
from diffusion_jax.samplers.batches import sample_batches


class FeatureSpace:
    """features(uint8 NHWC [N, ...]) -> dict(features [N, D], logits [N, K]); and a name."""

    def __init__(self, eval_config):
        space = eval_config.get('feature_space', 'inception')
        if space not in FEATURE_SPACES:
            raise ValueError(f'eval.feature_space={space!r}: use one of {", ".join(FEATURE_SPACES)}.')
        self.name = space
        if space == 'inception':
            from diffusion_jax.evaluation import inception  # pylint: disable=import-outside-toplevel
            path = eval_config.get('inception_weights', '') or ''
            self._variables = inception.load_pytorch_fid_weights(path)
            self.identity = _file_identity(path)
            self._fn = lambda images: _rename(inception.inception_features(self._variables, images))
        else:
            from diffusion_jax.evaluation import feature_net  # pylint: disable=import-outside-toplevel
            folder = eval_config.get('feature_net_dir', '') or ''
            if not image_utils.exists(os.path.join(folder, feature_net.META_FILE)):
                raise FileNotFoundError(
                    f'eval.feature_net_dir={folder!r} holds no trained feature net: train one with '
                    'python -m diffusion_jax.evaluation.feature_net --dataset=<dataset> --out=DIR '
                    'and set --config.eval.feature_net_dir=DIR.')
            model, params, self.meta = feature_net.load_feature_net(folder)
            self.identity = _file_identity(os.path.join(folder, feature_net.PARAMS_FILE))
            self._fn = lambda images: feature_net.feature_net_features(model, params, images)

    def __call__(self, images_uint8) -> dict:
        return self._fn(images_uint8)


def _file_identity(path: str) -> str:
    """What identifies a weights file for the cache key: its sha256 (the file is read once;
    a re-converted or retrained feature space must not reuse statistics of the old one)."""
    import hashlib  # pylint: disable=import-outside-toplevel
    if not path or not image_utils.exists(path):
        return f'{path}:absent'
    digest = hashlib.sha256()
    with image_utils.as_path(path).open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _rename(out: dict) -> dict:
    # Published Inception Scores use the logits without the final bias (the original TF code).
    return dict(features=out['pool'], logits=out.get('logits_unbiased', out['logits']))


def reference_features(config, space: FeatureSpace, max_keep: int, folder: str) -> dict:
    """Statistics (float64 mean/cov accumulators) of the reference split, and up to max_keep of
    its features for precision/recall, cached on disk."""
    from diffusion_jax import input_pipeline  # pylint: disable=import-outside-toplevel
    e = config.eval
    split = e.get('reference_split', 'train')
    # max_keep is in the name: a cache made for fewer samples must not cap precision/recall.
    name = f'ref_{config.data.dataset.replace("/", "_")}_{split}_{space.name}_{max_keep}.npz'

    def compute():
        ds = input_pipeline.get_dataset(config.data, split)
        stats, kept = None, []
        for batch in input_pipeline.eval_iterator(ds, e.batch_size):
            images = image_utils.to_uint8(batch['image'][batch['mask']])
            feats = space(images)['features']
            stats = (stats or fid.RunningStats.zeros(feats.shape[1])).update(feats)
            if sum(len(k) for k in kept) < max_keep:
                kept.append(feats)
        arrays = fid.stats_to_arrays(fid.merge_across_processes(stats))
        arrays['features'] = np.concatenate(kept)[:max_keep].astype(np.float32)
        return arrays

    # Everything that changes the statistics keys the cache (fid.reference_stats).
    d = config.data
    key = dict(dataset=d.dataset, split=split, image_size=d.image_size,
               channels=d.get('channels', 0), crop_size=d.get('crop_size', 0),
               feature_space=space.name, weights=getattr(space, 'identity', ''),
               max_keep=max_keep)
    return fid.reference_stats(os.path.join(folder, name), compute, key=key)


class FeatureStream:
    """Running statistics of streamed feature batches, plus the features kept for
    precision/recall (the first max_keep), the logits for IS and the first grid images.

    add(images uint8 [b, H, W, C]) runs the feature space on one batch; host memory is the
    kept features and logits, O(N·D).
    """

    def __init__(self, space: FeatureSpace, max_keep: int, keep_images: int = 64):
        self.space, self.max_keep, self.keep_images = space, max_keep, keep_images
        self.stats = None
        self._features, self._logits, self._images = [], [], []

    def add(self, images) -> None:
        images = np.asarray(images)
        out = self.space(images)
        feats = np.asarray(out['features'], np.float32)
        self.stats = (self.stats or fid.RunningStats.zeros(feats.shape[1])).update(feats)
        kept = sum(len(f) for f in self._features)
        if kept < self.max_keep:
            self._features.append(feats[:self.max_keep - kept])
        self._logits.append(np.asarray(out['logits'], np.float32))
        shown = sum(len(i) for i in self._images)
        if shown < self.keep_images:
            self._images.append(images[:self.keep_images - shown])

    @property
    def num_samples(self) -> int:
        return 0 if self.stats is None else int(self.stats.n)

    def features(self) -> dict:
        return dict(features=np.concatenate(self._features), logits=np.concatenate(self._logits))

    def images(self) -> np.ndarray:
        return np.concatenate(self._images)


def stream_features(space: FeatureSpace, image_batches: Iterable, max_keep: int) -> FeatureStream:
    """Feeds uint8 image batches [b, H, W, C] through the feature space, one at a time."""
    stream = FeatureStream(space, max_keep)
    for images in image_batches:
        stream.add(images)
    if stream.num_samples == 0:
        raise ValueError('no samples to evaluate')
    return stream


def sample_metrics(fake_features: dict, ref: dict, k: int = 3, is_splits: int = 10,
                   fake_stats: fid.RunningStats | None = None) -> dict:
    """FID, IS and precision/recall of fake features against reference arrays.

    fake_stats: the statistics of all fake features when they were streamed (else computed
    from fake_features['features']); precision/recall uses the first len(ref['features']).
    """
    if fake_stats is None:
        fake_stats = fid.RunningStats.zeros(fake_features['features'].shape[1]).update(
            fake_features['features'])
    fid_value = fid.fid_from_stats(fid.stats_from_arrays(ref), fake_stats)
    is_mean, is_std = fid.inception_score(fake_features['logits'], num_splits=is_splits)
    real = ref['features']
    fake = fake_features['features'][:len(real)]
    precision, recall = fid.precision_recall(real, fake, k=k)
    return dict(fid=float(fid_value), inception_score=float(is_mean),
                inception_score_std=float(is_std), precision=float(precision),
                recall=float(recall), num_samples=int(fake_stats.n),
                num_reference_for_pr=int(len(real)))


# Heusel et al. 2017 (FID), Ho et al. 2020 Sec. 4 and Dhariwal & Nichol 2021 score 50,000 samples
# against Inception: FID is biased upward at fewer samples (Chong & Forsyth 2020), so a number
# from fewer is not comparable with published ones.
PROTOCOL_SAMPLES = 50_000


def protocol_warnings(feature_space: str, num_samples: int) -> list[str]:
    """The warnings a sample-quality report carries: fewer than PROTOCOL_SAMPLES samples scored
    in Inception space (the published protocol's feature space)."""
    if feature_space == 'inception' and num_samples < PROTOCOL_SAMPLES:
        return [f'FID/IS/precision-recall of {num_samples:,} samples against Inception: the '
                f'published protocol scores {PROTOCOL_SAMPLES:,}, and FID is biased upward at '
                'fewer samples, so these numbers are not comparable with published ones']
    return []


def chain_steps(config) -> int:
    """K, the number of steps of the chain config.sampling runs (the respaced diffusion's steps
    for gaussian; num_steps for flow/edm; all T levels for cold)."""
    process = config.diffusion.get('process', 'gaussian')
    if process == 'gaussian':
        # pylint: disable=import-outside-toplevel
        from diffusion_jax.diffusion import create_diffusion
        from diffusion_jax.respace import respaced
        return int(respaced(create_diffusion(config.diffusion),
                            config.sampling.get('num_steps', '')).num_timesteps)
    if process == 'cold':
        return int(config.diffusion.num_timesteps)
    return int(config.sampling.num_steps)


def sampler_fields(config) -> dict:
    """What drew the samples: the sampler, its steps and η, the guidance settings and whether
    the EMA parameters were used (eval.use_ema), as the report's fields."""
    s = config.sampling
    out = dict(sampler=s.method, num_steps=str(s.num_steps), sampler_steps=chain_steps(config),
               eta=float(s.eta), clip_denoised=bool(s.clip_denoised),
               dynamic_threshold=float(s.get('dynamic_threshold', 0.0)),
               guidance_scale=float(s.get('guidance_scale', 0.0)),
               guidance_rescale=float(s.get('guidance_rescale', 0.0)),
               guidance_interval=str(s.get('guidance_interval', '')),
               guidance_model_workdir=str(s.get('guidance_model_workdir', '')),
               classifier_scale=float(s.get('classifier_scale', 0.0)),
               classifier_workdir=str(s.get('classifier_workdir', '')),
               ddim_guidance=str(s.get('ddim_guidance', 'auto')),
               use_ema=bool(config.eval.get('use_ema', True)))
    if out['guidance_model_workdir']:
        out['guidance_model_step'] = int(s.get('guidance_model_step', -1))
    return out


def reference_fields(config, space: 'FeatureSpace', ref: dict) -> dict:
    """The reference set (dataset, split, number of real images in its statistics) and the
    feature space (its name and the sha256 of its weights)."""
    return dict(reference_dataset=config.data.dataset,
                reference_split=config.eval.get('reference_split', 'train'),
                reference_size=int(np.asarray(ref['n'])), feature_space=space.name,
                feature_weights=getattr(space, 'identity', ''))


def report_line(result: dict) -> str:
    """The one log line of a sample-quality report: the metrics and everything they depend on."""
    if result.get('sampler'):
        guidance = [f'{k}={result[k]:g}' for k in ('guidance_scale', 'classifier_scale')
                    if result.get(k)]
        if result.get('guidance_model_workdir'):
            guidance.append(f"autoguidance by {result['guidance_model_workdir']}")
        drawn = (f"sampler {result['sampler']} num_steps={result['num_steps']!r} "
                 f"({result['sampler_steps']} steps), eta={result['eta']:g}, guidance: "
                 f"{', '.join(guidance) or 'none'}, {'EMA' if result['use_ema'] else 'raw'} "
                 'parameters')
    else:
        drawn = f"samples from {result['samples_path']}"
    return (f"FID {result['fid']:.3f}, IS {result['inception_score']:.3f} ± "
            f"{result['inception_score_std']:.3f}, precision {result['precision']:.3f}, recall "
            f"{result['recall']:.3f} of {result['num_samples']:,} samples against "
            f"{result['reference_dataset']}/{result['reference_split']} "
            f"({result['reference_size']:,} images) in {result['feature_space']} space; {drawn}")


def _reference_folder(config, workdir: str) -> str:
    return config.eval.get('reference_dir', '') or os.path.join(workdir, 'eval')


def evaluate_samples(config, workdir: str, variables, step: int, mesh) -> dict:
    """Draws config.eval.num_samples samples and scores them; writes eval/samples_<step>.json.

    The samples stream: each batch is drawn as uint8 on the device, its features enter the
    running statistics, and the pixels are dropped (the next batch is already being drawn).
    """
    e = config.eval
    space = FeatureSpace(e)
    num = int(e.get('num_samples', 50_000))
    # A latent run's samples are decoded to pixels first: FID/IS/PR compare pixels with pixels.
    autoencoder = latents.for_config(config, mesh)
    decoder = None if autoencoder is None else latents.make_decoder(autoencoder)
    batches = (x for x, _ in sample_batches(config, variables, mesh, num, uint8=True,
                                            classifier=run.classifier_for(config),
                                            guide=run.guide_for(config, mesh),
                                            decoder=decoder))
    stream = stream_features(space, batches, max_keep=num)
    ref = reference_features(config, space, max_keep=num, folder=_reference_folder(config, workdir))
    metrics = sample_metrics(stream.features(), ref, fake_stats=stream.stats)
    result = dict(metrics, step=step, dataset=config.data.dataset,
                  **reference_fields(config, space, ref), **sampler_fields(config),
                  warnings=protocol_warnings(space.name, metrics['num_samples']))
    _log_report(f'sample quality at step {step}', result)
    if jax.process_index() == 0:
        folder = os.path.join(workdir, 'eval')
        image_utils.write_json(os.path.join(folder, f'samples_{step}.json'), result)
        image_utils.save_grid(os.path.join(folder, f'samples_{step}.png'), stream.images())
    return result


def _log_report(what: str, result: dict) -> None:
    logging.info('%s: %s', what, report_line(result))
    for warning in result['warnings']:
        logging.warning('%s: %s', what, warning)


# ----------------------------------------------------------------------------------------------
# An existing samples file (eval.samples_path)
# ----------------------------------------------------------------------------------------------
def _pick_key(names: list[str], path: str) -> str:
    """'images' (ours), else 'arr_0' (OpenAI's guided-diffusion/ADM npz), else the sole array."""
    for key in ('images', 'arr_0'):
        if key in names:
            return key
    if len(names) == 1:
        return names[0]
    raise ValueError(f'eval.samples_path={path!r} holds arrays {names}: none is named \'images\' '
                     "or 'arr_0' and there is more than one; save the samples as 'images'.")


class SamplesFile:
    """The uint8 NHWC image array of a .npz (or .npy) file, read batch by batch.

    A member of an .npz is a .npy file inside a zip archive; its header gives dtype and shape,
    and its rows are read in order straight from the archive (compressed or not), so a 50k
    LSUN-256 file (9.8 GB of pixels) never sits in memory whole.
    """

    def __init__(self, path: str, image_size: int, channels: int):
        self.path = path
        target = image_utils.as_path(path)
        if not target.exists() or target.is_dir():
            raise FileNotFoundError(f'eval.samples_path={path!r} does not exist: point it at a '
                                    'samples .npz (e.g. <workdir>/samples/<step>/samples.npz).')
        if path.endswith('.npy'):
            self._open = lambda: target.open('rb')
            self.key = None
        else:
            try:
                with target.open('rb') as raw, zipfile.ZipFile(raw) as archive:
                    names = [n[:-4] for n in archive.namelist() if n.endswith('.npy')]
            except zipfile.BadZipFile as err:
                raise ValueError(f'eval.samples_path={path!r} is not an .npz file ({err}): '
                                 'write it with numpy.savez.') from err
            self.key = _pick_key(names, path)
            self._open = lambda: _ZipMember(path, self.key + '.npy')
        with self._open() as f:
            self.shape, self._fortran, dtype = _npy_header(f, path)
        expect = (image_size, image_size, channels)
        if dtype != np.uint8:
            raise ValueError(f'eval.samples_path={path!r}: array {self.key!r} is {dtype}, not '
                             'uint8: save pixels 0..255 as uint8 (image_utils.to_uint8).')
        if len(self.shape) != 4 or tuple(self.shape[1:]) != expect or self._fortran:
            raise ValueError(
                f'eval.samples_path={path!r}: array {self.key!r} has shape {self.shape}; it must '
                f'be NHWC [N, {image_size}, {image_size}, {channels}] (C order) to match '
                f'data.image_size={image_size} and data.channels={channels}.')
        self.num_samples = int(self.shape[0])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        row = int(np.prod(self.shape[1:]))
        with self._open() as f:
            _npy_header(f, self.path)
            for start in range(0, self.num_samples, batch_size):
                n = min(batch_size, self.num_samples - start)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise ValueError(f'eval.samples_path={self.path!r} is truncated: expected '
                                     f'{self.num_samples} images, the data ends at {start}.')
                yield np.frombuffer(data, np.uint8).reshape((n, *self.shape[1:]))


class _ZipMember:
    def __init__(self, path, name):
        self._raw = image_utils.as_path(path).open('rb')  # a local path or a URI
        self._archive = zipfile.ZipFile(self._raw)
        self._file = self._archive.open(name)

    def read(self, n=-1):
        return self._file.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()
        self._archive.close()
        self._raw.close()
        self._archive.close()


def _npy_header(f, path):
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        return np.lib.format.read_array_header_2_0(f)
    except ValueError as err:
        raise ValueError(f'eval.samples_path={path!r} holds no readable .npy array ({err}).'
                         ) from err


def evaluate_samples_file(config, workdir: str) -> dict:
    """FID / IS / precision-recall of the images in config.eval.samples_path against the
    configured reference statistics (eval.reference_split of data.dataset in
    eval.feature_space), without a model; writes eval/samples_file_<name>.json.

    The file: an .npz with uint8 NHWC images under 'images' (ours), 'arr_0' (OpenAI's), or as
    its sole array (or an .npy of that array), [N, data.image_size, data.image_size,
    data.channels]. All N images are scored; precision/recall uses min(N, ...) of them, as
    evaluate_samples does with eval.num_samples.
    """
    e, d = config.eval, config.data
    path = os.fspath(e.get('samples_path', '') or '')
    if not path:
        raise ValueError("eval.samples_path='' names no file: set it to a samples .npz.")
    samples = SamplesFile(path, int(d.image_size), int(d.channels))
    if samples.num_samples < 10:
        raise ValueError(f'eval.samples_path={path!r} holds {samples.num_samples} images: the '
                         'Inception Score needs at least 10 (its 10 splits).')
    space = FeatureSpace(e)
    num = samples.num_samples
    stream = stream_features(space, samples.batches(int(e.batch_size)), max_keep=num)
    ref = reference_features(config, space, max_keep=num, folder=_reference_folder(config, workdir))
    metrics = sample_metrics(stream.features(), ref, fake_stats=stream.stats)
    # The sampler that made the file is not known here: the report says so instead of naming one.
    result = dict(metrics, samples_path=path, array=samples.key, dataset=d.dataset,
                  **reference_fields(config, space, ref), sampler=None,
                  sampler_note='samples read from eval.samples_path; their sampler is not recorded',
                  warnings=protocol_warnings(space.name, metrics['num_samples']))
    _log_report(f'sample quality of {path}', result)
    if jax.process_index() == 0:
        stem = os.path.splitext(os.path.basename(path))[0]
        image_utils.write_json(os.path.join(workdir, 'eval', f'samples_file_{stem}.json'), result)
    return result
