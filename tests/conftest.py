"""Test setup: 8 fake CPU devices so sharded code paths run on one host.

XLA reads XLA_FLAGS when the backend starts, so this must run before anything imports jax.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


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
