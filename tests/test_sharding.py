"""Data parallelism: a loss-and-gradient evaluation on a batch sharded over 8 devices equals the
single-device result."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as dl
from diffusion_jax import schedules, sharding


def _loss(params, diffusion, x0, t, noise):
    def model_fn(x_t, tt):
        h = jnp.tanh(x_t @ params['w1'] + params['temb'][tt][:, None, None, :])
        return h @ params['w2']
    return jnp.mean(diffusion.training_losses(model_fn, x0, t, noise)['loss'])


@pytest.mark.parametrize('var_type,loss_type', [('fixed_large', 'mse'), ('learned_range', 'hybrid')])
def test_sharded_loss_and_grad_equal_single_device(var_type, loss_type):
    assert jax.device_count() == 8, 'tests/conftest.py should give 8 CPU devices'
    d = dl.GaussianDiffusion(schedules.get_beta_schedule('linear', 100), 'eps', var_type, loss_type)
    c_out = 4 if var_type == 'learned_range' else 2
    key = jax.random.key(0)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    params = {'w1': jax.random.normal(k1, (2, 16)) * 0.5, 'w2': jax.random.normal(k2, (16, c_out)) * 0.1,
              'temb': jax.random.normal(k3, (100, 16)) * 0.1}
    x0 = np.asarray(jax.random.uniform(k4, (16, 4, 4, 2), minval=-1, maxval=1))
    t = np.asarray(jax.random.randint(k5, (16,), 0, 100), np.int32)
    noise = np.asarray(jax.random.normal(key, x0.shape))
    grad_fn = jax.jit(jax.value_and_grad(_loss))

    single = jax.devices()[0]
    ref = grad_fn(jax.device_put(params, single), d, *jax.device_put((x0, t, noise), single))

    mesh = sharding.make_mesh()
    batch = sharding.shard_batch((x0, t, noise), mesh)
    assert len(batch[0].sharding.device_set) == 8
    got = grad_fn(sharding.replicate(params, mesh), d, *batch)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got[1], ref[1])


def test_batch_not_divisible_by_devices_is_a_clear_error():
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match='batch_size=12 is not divisible by the 8 devices'):
        sharding.check_global_batch(12, mesh)


def test_make_mesh_spans_every_device_with_automatic_axes():
    mesh = sharding.make_mesh()
    # ('data', 'fsdp') with fsdp = 1 by default: data parallelism over every device.
    assert mesh.axis_names == ('data', 'fsdp') and mesh.devices.shape == (8, 1)
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2
    assert sharding.make_mesh(jax.devices()[:2]).devices.size == 2


@pytest.mark.parametrize('args, match', [
    (('127.0.0.1:1234', None, None), '--num_processes, --process_id missing'),
    ((None, 2, 0), '--coordinator_address missing'),
    (('127.0.0.1:1234', 2, 2), r'--process_id=2 is not in \[0, --num_processes=2\)'),
])
def test_incomplete_or_inconsistent_distributed_flags_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        sharding.initialize_distributed(*args)


def test_no_flags_and_no_cluster_is_a_single_process_run(monkeypatch):
    for var in ('SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_PROCID', 'TPU_WORKER_HOSTNAMES'):
        monkeypatch.delenv(var, raising=False)
    assert sharding.initialize_distributed() is False
    assert jax.process_count() == 1
    assert sharding.any_process(True) and not sharding.any_process(False)
