"""Timestep samplers for the training objective: uniform, and loss-aware importance sampling.

The bound is L_vlb = Σ_t L_t = T · E_{t~U}[L_t]. Sampling t from any p(t) > 0 and weighting the
term by w(t) = 1/(T p(t)) keeps the estimate unbiased: E_{t~p}[w(t) T L_t] = Σ_t L_t. Nichol &
Dhariwal 2021 (Sec. 3.3, eq. 18) choose p(t) ∝ √E[L_t²] from a history of the last 10 values of
each L_t, which cuts the variance of the L_vlb gradient; until every t has a full history they
sample uniformly.

Every sampler is a pair of pure functions over an explicit state pytree:
    t, weights = sample(state, rng, batch_size)        # t: [B] int32, weights: [B] float32
    state = update(state, t, losses)                    # losses: [B] float32, one per t
so the state can live inside a jitted, sharded train step. Under jit the batch is the global
batch, so every device sees the same t and losses and the replicated state stays in agreement.
"""
from __future__ import annotations

import chex
import flax.struct
import jax
import jax.numpy as jnp

# Nichol & Dhariwal 2021, Sec. 3.3: "we keep a history of the previous 10 values for every loss
# term"; their code mixes in a uniform share of 0.001 so every t keeps a positive probability.
HISTORY_PER_TERM = 10
UNIFORM_PROB = 0.001


@flax.struct.dataclass
class UniformState:
    """Uniform sampling has no state beyond T."""
    num_timesteps: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class LossAwareState:
    """History of recent L_t values: loss_history [T, K] float32, counts [T] int32 (≤ K)."""
    loss_history: jax.Array
    counts: jax.Array
    uniform_prob: float = flax.struct.field(pytree_node=False, default=UNIFORM_PROB)

    @property
    def num_timesteps(self) -> int:
        return self.loss_history.shape[0]


def uniform_init(num_timesteps: int) -> UniformState:
    return UniformState(num_timesteps=num_timesteps)


def loss_aware_init(num_timesteps: int, history: int = HISTORY_PER_TERM,
                    uniform_prob: float = UNIFORM_PROB) -> LossAwareState:
    return LossAwareState(loss_history=jnp.zeros((num_timesteps, history), jnp.float32),
                          counts=jnp.zeros((num_timesteps,), jnp.int32), uniform_prob=uniform_prob)


def init(name: str, num_timesteps: int):
    """The initial state of a sampler named 'uniform' or 'loss_aware'."""
    if name == 'uniform':
        return uniform_init(num_timesteps)
    if name == 'loss_aware':
        return loss_aware_init(num_timesteps)
    raise ValueError(f"timestep sampler {name!r} is unknown; choose 'uniform' or 'loss_aware'.")


def probabilities(state) -> jax.Array:
    """p(t) for every t: [T] float32, summing to 1."""
    if isinstance(state, UniformState):
        return jnp.full((state.num_timesteps,), 1.0 / state.num_timesteps, jnp.float32)
    num_t = state.num_timesteps
    weights = jnp.sqrt(jnp.mean(jnp.square(state.loss_history), axis=-1))
    p = weights / jnp.maximum(jnp.sum(weights), 1e-30)
    p = p * (1.0 - state.uniform_prob) + state.uniform_prob / num_t
    warm = jnp.all(state.counts >= state.loss_history.shape[1]) & (jnp.sum(weights) > 0)
    return jnp.where(warm, p, jnp.full_like(p, 1.0 / num_t))


def sample(state, rng: jax.Array, batch_size: int):
    """t ~ p(t) and importance weights w = 1/(T p(t)): ([B] int32, [B] float32)."""
    p = probabilities(state)
    num_t = p.shape[0]
    t = jax.random.choice(rng, num_t, shape=(batch_size,), p=p).astype(jnp.int32)
    weights = 1.0 / (num_t * p[t])
    return t, weights.astype(jnp.float32)


def update(state, t: jax.Array, losses: jax.Array):
    """Push each (t, L_t) of the batch into the history, oldest value first out.

    The batch is processed in order (a scan), so repeated timesteps in a batch all enter the
    history, as they would one at a time.
    """
    if isinstance(state, UniformState):
        return state
    chex.assert_rank([t, losses], 1)
    chex.assert_equal_shape([t, losses])
    k = state.loss_history.shape[1]

    def push(carry, item):
        history, counts = carry
        ti, li = item
        # Shift left and append: the row always holds the last k values in arrival order.
        row = jnp.roll(history[ti], -1).at[k - 1].set(li.astype(jnp.float32))
        return (history.at[ti].set(row), counts.at[ti].set(jnp.minimum(counts[ti] + 1, k))), None

    (history, counts), _ = jax.lax.scan(
        push, (state.loss_history, state.counts),
        (t.astype(jnp.int32), jax.lax.stop_gradient(losses)))
    return state.replace(loss_history=history, counts=counts)
