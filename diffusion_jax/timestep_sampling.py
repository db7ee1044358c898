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
SAMPLERS = ('uniform', 'loss_aware')  # diffusion.timestep_sampler: the names init accepts


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


def _stable_order(t: jax.Array, num_t: int) -> jax.Array:
    """The permutation that sorts t [B] stably (batch order within equal t).

    One sort of the packed int32 keys t·B + i (unique, so any sort is stable) where they fit:
    on XLA:CPU a one-operand sort of int32 keys is ~5x faster than a key-value argsort.
    """
    batch = t.shape[0]
    if num_t * batch < 2**31:
        return jnp.sort(t * batch + jnp.arange(batch, dtype=jnp.int32)) % batch
    return jnp.argsort(t, stable=True)


def update(state, t: jax.Array, losses: jax.Array):
    """Push each (t, L_t) of the batch into the history, oldest value first out.

    Equal to pushing the batch one item at a time in batch order: with n_t the number of items
    of timestep t in the batch and r ∈ [0, n_t) an item's rank among them (batch order),

        history'[t] = (history[t] ++ [L of t's items in rank order])[-K:],
        counts'[t]  = min(counts[t] + n_t, K).

    So the old values shift left by n_t (one gather) and the item of rank r lands in column
    K − n_t + r when that is ≥ 0 (one scatter; items pushed out by later ones of the same t
    are dropped); n_t is a scatter-add of ones. The ranks come from a stable sort by t and a
    running maximum: O(B log B + T·K) work with no loop over the batch, where a scan over the
    items is B sequential dependent updates of the [T, K] array inside every train step (on
    an accelerator, B dependent kernel sequences). t, losses: [B].
    """
    if isinstance(state, UniformState):
        return state
    chex.assert_rank([t, losses], 1)
    chex.assert_equal_shape([t, losses])
    num_t, k = state.loss_history.shape
    t = t.astype(jnp.int32)
    losses = jax.lax.stop_gradient(losses).astype(jnp.float32)
    order = _stable_order(t, num_t)
    t_sorted, losses_sorted = t[order], losses[order]
    batch = t.shape[0]
    position = jnp.arange(batch, dtype=jnp.int32)
    # rank = position − (position of the first item of the same t), via a running maximum.
    starts = jnp.concatenate([jnp.ones((1,), bool), t_sorted[1:] != t_sorted[:-1]])
    rank = position - jax.lax.cummax(jnp.where(starts, position, 0))
    n_per_t = jnp.zeros((num_t,), jnp.int32).at[t].add(1)  # [T]
    # Shift: column j takes old column j + n_t; columns that old values no longer reach are
    # all overwritten by the scatter below (the last min(n_t, K) columns).
    source = jnp.arange(k, dtype=jnp.int32)[None, :] + n_per_t[:, None]  # [T, K]
    shifted = jnp.take_along_axis(state.loss_history, jnp.minimum(source, k - 1), axis=1)
    shifted = jnp.where(source < k, shifted, 0.0)
    column = k - n_per_t[t_sorted] + rank
    # Items with column < 0 were pushed out by later items of their t: send them out of range,
    # to distinct columns K + rank so that every (row, column) pair of the scatter is unique.
    column = jnp.where(column >= 0, column, k + rank)
    history = shifted.at[t_sorted, column].set(losses_sorted, mode='drop', unique_indices=True)
    counts = jnp.minimum(state.counts + n_per_t, k)
    return state.replace(loss_history=history, counts=counts)
