"""Cold diffusion (Bansal et al. 2022): deterministic degradations D(x_0, s), the restoration
loss and the fully degraded prior.

Every degradation here is linear in the image and written in one form,

    D(x_0, s) = m_s ⊙ (R_s x_0 C_sᵀ) + f_s · mean_hw(x_0) + o_s,        s = 0, 1, …, T,

applied per channel: R_s [H, H] and C_s [W, W] act on rows and columns (a separable blur or
pixelation), m_s [H, W] multiplies pixels (a mask), f_s weighs the per-image channel mean, o_s
[H, W, C] is an offset (0 for the four degradations; the additive D(x_0, s) = x_0 + s·e of the
paper's argument for Algorithm 2 is o_s = s·e with the rest the identity). The
tables are built once in float64 (numpy) and gathered per example, so a batch of mixed levels
costs one einsum. D(x_0, 0) = x_0 for every degradation.

  blur      R_s = K_{s-1} ⋯ K_0 (and C_s alike): the composition of s one-dimensional Gaussian
            blurs of std σ_i = blur_std_start + blur_std_step · i, blur_kernel_size taps,
            'reflect' (mirror without repeating the edge, PyTorch's) or 'circular' padding;
            the 2-d kernel is separable, so the 2-d composition is the product of the 1-d ones.
            Bansal et al.'s CIFAR-10 schedule ('Special_6_routine'): σ_i = 0.35 + i/100, 11x11,
            reflect, T = 50 (configs/digits_cold_blur.py). At s = T the composition is followed by
            the spatial mean (their `--discrete` generation runs): D(x_0, T) = mean_hw(K^T x_0),
            one colour per channel, the state a Gaussian mixture can model.
  mask      m_s = ∏_{i<s} (1 - exp(-r²/(2 σ_i²))), σ_i = mask_std_step · (i + mask_initial),
            r the distance to the hole's centre c: the paper's growing Gaussian-edged hole.
            diffusion.mask_center='center' (default; the reference's 'Incremental' kernels):
            c = ((H-1)//2, (W-1)//2), the table m_s. 'random' (the paper's inpainting runs,
            'Random_Incremental'): c uniform over the H x W pixels, drawn per image from the
            training key (loss / training_losses(key=...)); degrade(x0, s, center=c) takes a
            given c [B, 2]. The centre pixel is 0 for s ≥ 1; D(x_0, T) = m_T ⊙ x_0. Sampling
            (cold_restore, the run's prior) restores centred holes: a random-centre network
            restores a hole wherever it is, the centred one is its fixed test case.
  pixelate  R_s = U_k A_k with k = ceil(s · L / T) halvings (A_k averages 2^k x 2^k blocks, U_k
            repeats them: nearest upsampling), L = log2(H) so D(x_0, T) = mean_hw(x_0).
  fade      D(x_0, s) = (1 - s/T) x_0 + (s/T) mean_hw(x_0): towards the per-image mean colour
            (this project's addition, not one of the paper's).

The network R(x_s, ·) is called with the chain index s - 1 ∈ [0, T) (as the reference code
calls denoise_fn(x_t, t - 1)); `timestep_map` is the identity on [0, T), so the one model
wrapper (diffusion.wrap_model, through ColdDiffusion.model_time) passes the index unchanged.
"""
from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

DEGRADATIONS = ('blur', 'mask', 'pixelate', 'fade')
BLUR_PADDINGS = ('reflect', 'circular')
METHODS = ('cold', 'cold_naive')
MASK_CENTERS = ('center', 'random')
# Degradations whose end point D(x_0, T) is one colour per channel (a prior over C numbers).
MEAN_END = ('blur', 'pixelate', 'fade')


# ----------------------------------------------------------------------------------------------
# One-dimensional operators (float64 numpy, [n, n])
# ----------------------------------------------------------------------------------------------
def gaussian_kernel_1d(size: int, std: float) -> np.ndarray:
    """exp(-u²/(2σ²)) for u = -(size//2) … size//2, normalised to sum 1 (torchgeometry's
    get_gaussian_kernel, which the reference blurs with). [size]."""
    u = np.arange(size, dtype=np.float64) - size // 2
    k = np.exp(-u**2 / (2.0 * std**2))
    return k / k.sum()


def blur_matrix(n: int, size: int, std: float, padding: str) -> np.ndarray:
    """The 1-d blur of a length-n signal as a matrix K [n, n]: y = K x is x padded by size//2
    ('reflect': x_1 x_0 | x_0 … | x_{n-2}; 'circular': wrap-around) and correlated with the
    Gaussian kernel (same-size output)."""
    pad = size // 2
    mode = {'reflect': 'reflect', 'circular': 'wrap'}[padding]
    kernel = gaussian_kernel_1d(size, std)
    out = np.zeros((n, n))
    for j in range(n):  # column j = the response to the basis vector e_j
        padded = np.pad(np.eye(n)[j], pad, mode=mode)
        out[:, j] = np.correlate(padded, kernel, mode='valid')
    return out


def mean_matrix(n: int) -> np.ndarray:
    """(1/n) 1 1ᵀ: replaces a signal by its mean. [n, n]."""
    return np.full((n, n), 1.0 / n)


def pixelate_matrix(n: int, halvings: int) -> np.ndarray:
    """Average 2^k blocks, then repeat each average 2^k times (nearest upsampling). [n, n]."""
    block = 2**halvings
    out = np.zeros((n, n))
    for start in range(0, n, block):
        out[start:start + block, start:start + block] = 1.0 / block
    return out


def blur_stds(num_timesteps: int, std_start: float, std_step: float) -> np.ndarray:
    """σ_i = std_start + std_step · i of the i-th of the T per-step blurs. [T]."""
    return std_start + std_step * np.arange(num_timesteps, dtype=np.float64)


def mask_sigmas(num_timesteps: int, std_step: float, initial: float) -> np.ndarray:
    """σ_i = std_step (i + initial) of the T per-step mask factors. [T]."""
    return std_step * (np.arange(num_timesteps, dtype=np.float64) + initial)


def mask_multipliers(height: int, width: int, num_timesteps: int, std_step: float,
                     initial: float, center=None) -> np.ndarray:
    """m_s = ∏_{i<s} (1 - exp(-r²/(2 σ_i²))), σ_i = std_step (i + initial), s = 0 … T, r the
    distance to center (row, col; default the centre pixel ((H-1)//2, (W-1)//2)).
    [T + 1, H, W] (m_0 = 1)."""
    cy, cx = ((height - 1) // 2, (width - 1) // 2) if center is None else center
    yy, xx = np.meshgrid(np.arange(height) - cy, np.arange(width) - cx, indexing='ij')
    r2 = (yy**2 + xx**2).astype(np.float64)
    out = [np.ones((height, width))]
    for i in range(num_timesteps):
        sigma = std_step * (i + initial)
        out.append(out[-1] * (1.0 - np.exp(-r2 / (2.0 * sigma**2))))
    return np.stack(out)


# ----------------------------------------------------------------------------------------------
# The process
# ----------------------------------------------------------------------------------------------
@flax.struct.dataclass
class ColdDiffusion:
    """A deterministic degradation schedule D(x_0, s), s = 0 … T, and its restoration loss.

    Arrays (traced leaves): rows [T+1, H, H], cols [T+1, W, W], mult [T+1, H, W], mean_weight
    [T+1], offset [T+1, H, W, C], timestep_map [T] (the identity). Static: degradation,
    num_timesteps.
    """
    rows: Any
    cols: Any
    mult: Any
    mean_weight: Any
    offset: Any
    timestep_map: Any
    mask_sigma: Any = None  # [T] σ_i of the mask factors (mask only; the random-centre masks)
    degradation: str = flax.struct.field(pytree_node=False, default='blur')
    num_timesteps: int = flax.struct.field(pytree_node=False, default=1)
    mask_center: str = flax.struct.field(pytree_node=False, default='center')

    methods = METHODS
    process = 'cold'
    name = 'cold'

    @property
    def random_center(self) -> bool:
        """Whether training draws the mask's centre per image (degradation='mask' only)."""
        return self.degradation == 'mask' and self.mask_center == 'random'

    def center_mask(self, center, s, dtype=jnp.float32):
        """m_s at per-image centres: center [B, 2] (row, col), s [B] in [0, T]. [B, H, W].
        m_s(p) = ∏_{i<s} (1 - exp(-|p - c|²/(2 σ_i²)))."""
        height, width = self.mult.shape[1:3]
        center = jnp.asarray(center, jnp.float32)
        yy = jnp.arange(height, dtype=jnp.float32)[None, :, None] - center[:, 0, None, None]
        xx = jnp.arange(width, dtype=jnp.float32)[None, None, :] - center[:, 1, None, None]
        r2 = yy**2 + xx**2  # [B, H, W]
        sigma = jnp.asarray(self.mask_sigma, jnp.float32)
        factors = 1.0 - jnp.exp(-r2[:, None] / (2.0 * sigma[None, :, None, None] ** 2))
        on = jnp.arange(self.num_timesteps)[None, :] < jnp.asarray(s)[:, None]  # i < s
        return jnp.prod(jnp.where(on[..., None, None], factors, 1.0), axis=1).astype(dtype)

    def draw_center(self, key, batch: int):
        """Mask centres c [B, 2] int32, uniform over the H x W pixels."""
        height, width = self.mult.shape[1:3]
        k_y, k_x = jax.random.split(key)
        return jnp.stack([jax.random.randint(k_y, (batch,), 0, height),
                          jax.random.randint(k_x, (batch,), 0, width)], axis=1)

    def model_time(self, t):
        """The network's time input for chain index t: the index itself (diffusion.wrap_model)."""
        return t

    def degrade(self, x0, s, center=None):
        """D(x_0, s): x0 [B, H, W, C], s [B] int in [0, T] (or a scalar); center [B, 2] the
        mask's centres (degradation='mask'; None: the table's, the centre pixel).
        Returns [B, H, W, C]."""
        s = jnp.broadcast_to(jnp.asarray(s, jnp.int32), x0.shape[:1])
        dtype = x0.dtype
        rows = jnp.asarray(self.rows, dtype)[s]
        cols = jnp.asarray(self.cols, dtype)[s]
        y = jnp.einsum('bhi,biwc,bjw->bhjc', rows, x0, cols)
        if center is not None:
            if self.degradation != 'mask':
                raise ValueError(f'a mask centre applies to diffusion.degradation=\'mask\', '
                                 f'not {self.degradation!r}.')
            mult = self.center_mask(center, s, dtype)
        else:
            mult = jnp.asarray(self.mult, dtype)[s]
        y = y * mult[..., None]
        mean = jnp.mean(x0, axis=(1, 2), keepdims=True)
        y = y + jnp.asarray(self.mean_weight, dtype)[s].reshape(-1, 1, 1, 1) * mean
        return y + jnp.asarray(self.offset, dtype)[s]

    def restore(self, model_fn, x_s, s):
        """x̂_0 = R(x_s, s) = model_fn(x_s, s - 1) for levels s [B] in [1, T]. [B, H, W, C]."""
        out = model_fn(x_s, jnp.asarray(self.timestep_map)[s - 1])
        return out[..., :x_s.shape[-1]].astype(x_s.dtype)

    def training_losses(self, model_fn, x0, t, noise=None, key=None):  # pylint: disable=unused-argument
        """The paper's L1 restoration loss per example, at level s = t + 1 (t [B] the chain
        index in [0, T) the timestep sampler draws):  L = mean |R(D(x_0, s), s) - x_0|.
        noise is ignored (the degradation is deterministic). key: the training key the
        random-centre mask (mask_center='random') draws its centres from (draw_center).
        Returns dict(loss=[B])."""
        s = t + 1
        center = None
        if self.random_center:
            if key is None:
                raise ValueError("diffusion.mask_center='random' draws the mask centres from "
                                 'the training key: pass key= to training_losses.')
            center = self.draw_center(key, x0.shape[0])
        x_s = self.degrade(x0, s, center)
        err = jnp.abs(self.restore(model_fn, x_s, s) - x0)
        return dict(loss=jnp.mean(err, axis=tuple(range(1, x0.ndim))))

    def loss(self, model_fn, x0, key, t=None):
        """The same L1 loss in the process interface's form (diffusion_jax.processes): levels
        s ~ U{1, …, T} drawn from key unless given as t [B]. Returns dict(loss=[B], t=[B]
        levels, quantile=[B] (s - 1)/T, the metrics' loss-per-quarter axis)."""
        k_center = None
        if self.random_center:  # the centres from their own stream; the levels as before
            key, k_center = jax.random.split(key)
        if t is None:
            t = jax.random.randint(key, (x0.shape[0],), 1, self.num_timesteps + 1)
        loss = self.training_losses(model_fn, x0, t - 1, key=k_center)['loss']
        return dict(loss=loss, t=t, quantile=(t - 1).astype(jnp.float32) / self.num_timesteps)

    def check_method(self, method: str) -> None:
        if method not in METHODS:
            raise ValueError(f'sampling.method={method!r} cannot run on diffusion.process='
                             f"'cold'; it runs {', '.join(METHODS)}.")


def _check(field: str, value, ok: bool, fix: str) -> None:
    if not ok:
        raise ValueError(f'diffusion.{field}={value!r} {fix}')


def create_cold_diffusion(config, image_shape) -> ColdDiffusion:
    """The ColdDiffusion of a `config.diffusion` section (process='cold') for images
    [H, W, C]. Fields: degradation, num_timesteps and the degradation's own (see the module
    docstring; configs/digits_cold_blur.py and digits_cold_mask.py hold the paper's values).
    ValueError in one line on a bad field."""
    height, width = int(image_shape[0]), int(image_shape[1])
    name = config.get('degradation', 'blur')
    _check('degradation', name, name in DEGRADATIONS, f'is not one of {", ".join(DEGRADATIONS)}.')
    T = int(config.num_timesteps)
    _check('num_timesteps', T, T >= 1, 'must be >= 1.')
    eye_h, eye_w = np.eye(height), np.eye(width)
    rows, cols = [eye_h], [eye_w]
    mult = np.ones((T + 1, height, width))
    mean_weight = np.zeros(T + 1)
    center = config.get('mask_center', 'center')
    _check('mask_center', center, center in MASK_CENTERS,
           f'is not one of {", ".join(MASK_CENTERS)}.')
    _check('mask_center', center, center == 'center' or name == 'mask',
           "applies to diffusion.degradation='mask' only; set mask_center='center'.")
    mask_sigma = np.zeros(T)
    if name == 'blur':
        size = int(config.get('blur_kernel_size', 11))
        padding = config.get('blur_padding', 'reflect')
        _check('blur_kernel_size', size, size >= 1 and size % 2 == 1, 'must be odd and >= 1.')
        _check('blur_padding', padding, padding in BLUR_PADDINGS,
               f'is not one of {", ".join(BLUR_PADDINGS)}.')
        _check('blur_kernel_size', size, padding != 'reflect' or size // 2 < min(height, width),
               f'needs size//2 < the image side {min(height, width)} with reflect padding.')
        stds = blur_stds(T, float(config.get('blur_std_start', 0.35)),
                         float(config.get('blur_std_step', 0.01)))
        _check('blur_std_start', float(stds[0]), bool(np.all(stds > 0)), 'gives σ_i <= 0.')
        for std in stds:
            rows.append(blur_matrix(height, size, std, padding) @ rows[-1])
            cols.append(blur_matrix(width, size, std, padding) @ cols[-1])
        if config.get('blur_to_mean', True):
            rows[-1], cols[-1] = mean_matrix(height) @ rows[-1], mean_matrix(width) @ cols[-1]
    elif name == 'pixelate':
        levels = int(round(math.log2(height)))
        _check('degradation', name, height == width == 2**levels,
               f'needs square images of a power-of-two side; got {height}x{width}.')
        for s in range(1, T + 1):
            k = math.ceil(s * levels / T)
            rows.append(pixelate_matrix(height, k))
            cols.append(pixelate_matrix(width, k))
    elif name == 'mask':
        std_step = float(config.get('mask_std_step', 0.1))
        _check('mask_std_step', std_step, std_step > 0, 'must be > 0.')
        initial = float(config.get('mask_initial', 11))
        mult = mask_multipliers(height, width, T, std_step, initial)
        mask_sigma = mask_sigmas(T, std_step, initial)
    else:  # fade
        frac = np.arange(T + 1, dtype=np.float64) / T
        mult = np.broadcast_to((1.0 - frac)[:, None, None], (T + 1, height, width)).copy()
        mean_weight = frac
    if len(rows) == 1:
        rows, cols = [eye_h] * (T + 1), [eye_w] * (T + 1)
    as32 = lambda a: jnp.asarray(np.asarray(a), jnp.float32)
    return ColdDiffusion(rows=as32(np.stack(rows)), cols=as32(np.stack(cols)), mult=as32(mult),
                         mean_weight=as32(mean_weight),
                         offset=jnp.zeros((T + 1, height, width, int(image_shape[2])),
                                          jnp.float32),
                         timestep_map=jnp.arange(T, dtype=jnp.int32),
                         mask_sigma=as32(mask_sigma), degradation=name, num_timesteps=T,
                         mask_center=center)


# ----------------------------------------------------------------------------------------------
# The fully degraded prior (generation)
# ----------------------------------------------------------------------------------------------
@flax.struct.dataclass
class MeanPrior:
    """A Gaussian mixture over the C channel means of D(x_0, T) (Bansal et al. fit one to the
    training images' channel means: the reference Trainer's sample_as_a_mean_blur_torch_gmm,
    10 full-covariance components), sampled and broadcast to [H, W, C], plus N(0, noise_std²)
    per pixel, the small noise the paper adds to x_T for diversity (0.002 in the reference).

    weights [K], means [K, C], chols [K, C, C] (Cholesky factors of the covariances).
    """
    weights: Any
    means: Any
    chols: Any
    noise_std: Any

    def sample(self, key, shape):
        """x_T [B, H, W, C] for shape = (B, H, W, C)."""
        k_comp, k_gauss, k_noise = jax.random.split(key, 3)
        batch, channels = shape[0], shape[-1]
        comp = jax.random.categorical(k_comp, jnp.log(self.weights), shape=(batch,))
        z = jax.random.normal(k_gauss, (batch, channels), jnp.float32)
        colour = self.means[comp] + jnp.einsum('bij,bj->bi', self.chols[comp], z)
        x = jnp.broadcast_to(colour[:, None, None, :], shape)
        return x + self.noise_std * jax.random.normal(k_noise, shape, jnp.float32)


def fit_mean_prior(cold: ColdDiffusion, images, *, num_components: int = 10,
                   noise_std: float = 0.002, seed: int = 0) -> MeanPrior:
    """Fits the MeanPrior to the channel means of D(x_0, T) over images [N, H, W, C] in [-1, 1]
    (sklearn's GaussianMixture, full covariances, seeded). Only for blur, pixelate and fade,
    whose end point is one colour per channel."""
    if cold.degradation not in MEAN_END:
        raise ValueError(f'diffusion.degradation={cold.degradation!r} ends in a masked image, '
                         'not a colour: restore given images (cold_restore) instead of '
                         'generating from a prior.')
    from sklearn import mixture  # pylint: disable=import-outside-toplevel
    images = jnp.asarray(images, jnp.float32)
    end = cold.degrade(images, jnp.full((images.shape[0],), cold.num_timesteps, jnp.int32))
    colours = np.asarray(jnp.mean(end, axis=(1, 2)), np.float64)
    k = int(min(num_components, colours.shape[0]))
    gmm = mixture.GaussianMixture(k, covariance_type='full', random_state=seed,
                                  reg_covar=1e-6).fit(colours)
    return MeanPrior(weights=jnp.asarray(gmm.weights_, jnp.float32),
                     means=jnp.asarray(gmm.means_, jnp.float32),
                     chols=jnp.asarray(np.linalg.cholesky(gmm.covariances_), jnp.float32),
                     noise_std=jnp.float32(noise_std))


@flax.struct.dataclass
class DataPrior:
    """The fully degraded states of given images: x_T = D(x_0, T) of images drawn uniformly
    (with replacement) from `states` [N, H, W, C], for degradations whose end point keeps part
    of the image (mask): sampling is then the deterministic restoration of degraded data."""
    states: Any

    def sample(self, key, shape):
        idx = jax.random.randint(key, (shape[0],), 0, self.states.shape[0])
        return self.states[idx]


# ----------------------------------------------------------------------------------------------
# A run's process (config.diffusion.process = 'cold')
# ----------------------------------------------------------------------------------------------
def is_cold(diffusion_config) -> bool:
    """Whether a `config.diffusion` section selects cold diffusion (process='cold')."""
    return diffusion_config.get('process', 'gaussian') == 'cold'


def image_shape(config) -> tuple[int, int, int]:
    """(H, W, C) the run's diffusion sees: the data's (data.image_size, data.channels), or a
    latent run's latent grid (data.latent_size, data.latent_channels, derived by
    run.resolve_config from the autoencoder)."""
    d = config.data
    if d.get('latents', '') and d.get('latent_size', 0):
        return (int(d.latent_size), int(d.latent_size), int(d.latent_channels))
    return (int(d.image_size), int(d.image_size), int(d.channels))


def diffusion_section(config):
    """A copy of config.diffusion with image_shape derived from the data (the field the 'cold'
    process builder reads; config_validation.resolve sets it on a cold run's config)."""
    import ml_collections  # pylint: disable=import-outside-toplevel
    d = ml_collections.ConfigDict(config.diffusion.to_dict())
    if is_cold(d):
        d.image_shape = image_shape(config)
    return d


def create_for_config(config):
    """The process a whole run config trains and samples with: the registry's 'cold' process
    (processes.get_process(diffusion_section(config)) builds the same; this module stays below
    the registry) where diffusion.process='cold', built at the data's shape, else
    diffusion.create_diffusion's GaussianDiffusion."""
    if is_cold(config.diffusion):  # what processes.get_process builds from diffusion_section
        return create_cold_diffusion(config.diffusion, image_shape(config))
    from diffusion_jax.diffusion import create_diffusion  # pylint: disable=import-outside-toplevel
    return create_diffusion(config.diffusion)


def run_prior(config, cold: ColdDiffusion):
    """The start states of a run's generation: blur/pixelate/fade a MeanPrior fitted to the
    first diffusion.prior_fit_examples training images (deterministic: the split and the
    mixture are seeded); mask a DataPrior of the degraded eval.split images (restoration of
    held-out data)."""
    # pylint: disable-next=import-outside-toplevel
    from diffusion_jax import input_pipeline
    d = config.diffusion
    if cold.degradation in MEAN_END:
        ds = input_pipeline.get_dataset(config.data, config.data.train_split)
        n = min(len(ds), int(d.get('prior_fit_examples', 10000)))
        images = ds.get(np.arange(n))['image']
        return fit_mean_prior(cold, images, num_components=int(d.get('prior_components', 10)),
                              noise_std=float(d.get('prior_noise_std', 0.002)),
                              seed=int(config.data.get('split_seed', 0)))
    split = config.get('eval', {}).get('split', 'test') if 'eval' in config else 'test'
    ds = input_pipeline.get_dataset(config.data, split)
    n = min(len(ds), int(d.get('prior_fit_examples', 10000)))
    images = jnp.asarray(ds.get(np.arange(n))['image'], jnp.float32)
    return DataPrior(states=cold.degrade(images, jnp.full((n,), cold.num_timesteps, jnp.int32)))
