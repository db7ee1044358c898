"""Autoguidance (Karras et al. 2024; sampling.guidance_model_workdir, guidance_model_step):
D̃ = D_weak + (1 + w)(D - D_weak) with w = sampling.guidance_scale (our classifier-free
convention: w = 0 is the model itself), for linear "models" through each process's denoiser, and
through the run layer with runs on disk (a separate guide run and an early checkpoint of the
same run); bad guides are refused in one line."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import diffusion as dl
from diffusion_jax import guidance, processes, run, sharding
from diffusion_jax.samplers import batches

pytestmark = pytest.mark.usefixtures('fast_compiles')


def _linear(a, b, x, t, self_cond=None):
    return a * x + b * jnp.reshape(t, (-1, 1, 1, 1)).astype(x.dtype)


def _gaussian():
    from configs import swissroll
    d = swissroll.get_config().diffusion
    d.update(num_timesteps=20, beta_schedule='linear', beta_start=0.01, beta_end=0.3)
    return processes.get_process(d)


@pytest.mark.parametrize('name', ['gaussian', 'flow', 'edm'])
def test_guided_denoiser_is_the_formula(name):
    """x̂_0 of the autoguided model_fn equals D_weak + (1 + w)(D - D_weak) from the two
    models' own x̂_0 (each process's own network call and preconditioning), and w = 0 is D."""
    process = {'gaussian': _gaussian, 'flow': processes.FlowMatching,
               'edm': processes.EDM}[name]()
    x = jax.random.normal(jax.random.key(0), (4, 2, 2, 1))
    t = {'gaussian': jnp.array([0, 5, 11, 19]), 'flow': jnp.array([0.1, 0.4, 0.7, 0.95]),
         'edm': jnp.array([0.01, 0.5, 3.0, 40.0])}[name]
    strong, weak = Partial(_linear, 0.7, 0.02), Partial(_linear, 0.2, -0.05)
    d, d_weak = process.denoise(strong, x, t), process.denoise(weak, x, t)
    for w in (0.0, 1.5):
        got = process.denoise(guidance.autoguidance_model_fn(strong, weak, w), x, t)
        np.testing.assert_allclose(got, d_weak + (1 + w) * (d - d_weak), rtol=1e-5, atol=1e-5)
    assert not np.allclose(d, d_weak, atol=1e-2)


# ----------------------------------------------------------------------------------------------
# Through the run layer: runs on disk
# ----------------------------------------------------------------------------------------------
def _config(**diffusion):
    from configs import model_configs, swissroll
    config = swissroll.get_config()
    config.model = model_configs.swissroll_mlp(hidden_dim=16, num_layers=1, out_dim=2,
                                               dropout=0.0)
    config.diffusion.update(num_timesteps=10, beta_schedule='linear', beta_start=0.01,
                            beta_end=0.5, **diffusion)
    config.sampling.update(method='ddim', batch_size=8, num_samples=8, clip_denoised=False)
    if diffusion.get('process') == 'flow':
        config.sampling.update(method='euler', num_steps='5')
        config.eval.nll_estimator = 'ode'
    return config


def _params(config, seed):
    from diffusion_jax import models
    params = models.init_params(models.get_model(config.model), jax.random.key(seed))['params']
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """main: a run with checkpoints at steps 0 (params P0) and 10 (P1, the latest); guide: a
    separate run of the same process (params P2); flow: a flow-matching run."""
    from diffusion_jax import checkpointing, train_state
    root = tmp_path_factory.mktemp('autoguidance')
    config = _config()
    p0, p1, p2 = (_params(config, s) for s in (0, 1, 2))
    run.create(str(root / 'main'), config, p0)
    resolved = run.resolve_config(str(root / 'main'), None, {}, 'sample')
    optimizer, _ = train_state.create_optimizer(resolved.optim)
    from diffusion_jax import models
    state = train_state.create_train_state(resolved, models.get_model(resolved.model), optimizer,
                                           jax.random.key(0))
    ckpt = checkpointing.Checkpointer(str(root / 'main'), 3)
    ckpt.save(state.replace(step=jnp.int32(10), params=p1, ema_params=p1,
                            opt_state=optimizer.init(p1)))
    ckpt.close()
    run.create(str(root / 'guide'), config, p2)
    run.create(str(root / 'flow'), _config(process='flow'), p2)
    return {k: str(root / k) for k in ('main', 'guide', 'flow')}, (p0, p1, p2)


def _draw(workdir, **sampling):
    typed = {f'sampling.{k}': v for k, v in sampling.items()}
    config = run.resolve_config(workdir, None, typed, 'sample')
    mesh = sharding.make_mesh()
    loaded = run.load_resolved(workdir, config, mesh=mesh)
    samples, _ = batches.draw_samples(config, loaded.variables, mesh, 8,
                                      guide=run.guide_for(config, mesh))
    return samples, config


def test_guide_equal_to_the_model_changes_nothing(runs):
    """Guided by its own latest checkpoint, the run samples what it samples unguided."""
    workdirs, _ = runs
    plain, _ = _draw(workdirs['main'])
    same, _ = _draw(workdirs['main'], guidance_model_workdir=workdirs['main'],
                    guidance_scale=2.0)
    np.testing.assert_allclose(same, plain, atol=2e-5)


@pytest.mark.parametrize('guide', ['early_checkpoint', 'other_run'])
def test_run_layer_guides_with_the_named_weak_model(runs, guide):
    """The Sampler's model is (1 + w) D(P1) - w D(weak) with weak = the main run's step-0
    parameters (guidance_model_step=0) or the separate guide run's: the same samples as
    samplers.sample over guidance.autoguidance_model_fn of those parameters."""
    from diffusion_jax import models, samplers
    workdirs, (p0, p1, p2) = runs
    extra = ({'guidance_model_workdir': workdirs['main'], 'guidance_model_step': 0}
             if guide == 'early_checkpoint' else {'guidance_model_workdir': workdirs['guide']})
    got, config = _draw(workdirs['main'], guidance_scale=1.5, **extra)
    model = models.get_model(config.model)
    weak = p0 if guide == 'early_checkpoint' else p2
    fn = guidance.autoguidance_model_fn(guidance.bind_model(model.apply, {'params': p1}),
                                        guidance.bind_model(model.apply, {'params': weak}), 1.5)
    diffusion = batches.sampling_target(config, dl.create_diffusion(config.diffusion))[0]
    want = samplers.sample(diffusion, fn, jax.random.fold_in(jax.random.key(0), 0), (8, 2),
                           method='ddim', clip_denoised=config.sampling.clip_denoised)['samples']
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-5)
    plain, _ = _draw(workdirs['main'])
    assert np.abs(got - plain).max() > 1e-2  # the guide matters


def test_bad_guides_are_one_line(runs, tmp_path):
    workdirs, _ = runs
    cases = (({'guidance_model_workdir': str(tmp_path)}, r'sampling.guidance_model_workdir=.*'
              'is not a run'),
             ({'guidance_model_workdir': workdirs['flow']}, r"diffusion.process='flow', but this "
              r"run has diffusion.process='gaussian'"),
             ({'guidance_model_workdir': workdirs['main'], 'guidance_model_step': 5},
              r'sampling.guidance_model_step=5: .* has checkpoints at steps \[0, 10\]'))
    for sampling, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            _draw(workdirs['main'], guidance_scale=1.0, **sampling)
        assert '\n' not in str(err.value)
    with pytest.raises(ValueError, match=r'sampling.classifier_scale=1.0 with '
                                         r'sampling.guidance_model_workdir'):
        _draw(workdirs['main'], guidance_scale=1.0, classifier_scale=1.0,
              guidance_model_workdir=workdirs['guide'])
