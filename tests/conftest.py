"""Test setup: 8 fake CPU devices so sharded code paths run on one host.

XLA reads XLA_FLAGS when the backend starts, so this must run before anything imports jax.
"""
import os
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# compile_cache_dir='auto' (every config's default) is <XDG_CACHE_HOME>/diffusion_jax/xla: a
# folder of this session's, so the suite never writes into the user's cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="diffusion_jax_test_cache_")


import pytest  # noqa: E402  (after the XLA flags above)


@pytest.fixture(scope='module')
def fast_compiles():
    """For modules whose programs are tiny: XLA's optimisation passes cost more than they save.
    Use with `pytestmark = pytest.mark.usefixtures('fast_compiles')`."""
    import jax  # pylint: disable=import-outside-toplevel
    previous = jax.config.read('jax_disable_most_optimizations')
    jax.config.update('jax_disable_most_optimizations', True)
    yield
    jax.config.update('jax_disable_most_optimizations', previous)
