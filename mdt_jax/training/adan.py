"""Adan as the original code uses it (sail-sg/Adan, the β's as keep rates: 0.98, 0.92, 0.99).

Not ``optax.adan``: optax 0.2.8 weights the gradient difference by (1 - b2) in the second moment
and in the update, where Adan (paper Algorithm 1 and the official code) uses b2 in this
parameterisation (0.92, not 0.08); see google-deepmind/optax PR #1715. Update, step k >= 1:

    diff = g - g_prev (0 at k = 1)
    m = b1 m + (1 - b1) g;  d = b2 d + (1 - b2) diff;  n = b3 n + (1 - b3) (g + b2 diff)^2
    denom = sqrt(n) / sqrt(1 - b3^k) + eps
    theta <- (theta - lr (m / (1 - b1^k) + b2 d / (1 - b2^k)) / denom) / (1 + lr wd)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class AdanState(NamedTuple):
  count: jax.Array
  m: Any
  d: Any
  n: Any
  prev_grad: Any


def adan(
    learning_rate: float,
    b1: float = 0.98,
    b2: float = 0.92,
    b3: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  def init(params):
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    return AdanState(jnp.zeros((), jnp.int32), zeros(), zeros(), zeros(), zeros())

  def update(grads, state, params=None):
    k = state.count + 1
    kf = k.astype(jnp.float32)
    first = state.count == 0
    diff = jax.tree.map(lambda g, p: jnp.where(first, 0.0, g - p), grads, state.prev_grad)
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, grads)
    d = jax.tree.map(lambda d, x: b2 * d + (1 - b2) * x, state.d, diff)
    n = jax.tree.map(
        lambda n, g, x: b3 * n + (1 - b3) * jnp.square(g + b2 * x), state.n, grads, diff
    )
    c1, c2, c3 = 1 - b1**kf, 1 - b2**kf, jnp.sqrt(1 - b3**kf)

    def step(m, d, n, p):
      delta = -learning_rate * (m / c1 + b2 * d / c2) / (jnp.sqrt(n) / c3 + eps)
      if weight_decay:
        if p is None:
          raise ValueError('adan with weight_decay needs params')
        return (p + delta) / (1 + learning_rate * weight_decay) - p
      return delta

    ps = params if params is not None else jax.tree.map(lambda _: None, m)
    updates = jax.tree.map(step, m, d, n, ps)
    return updates, AdanState(k, m, d, n, grads)

  return optax.GradientTransformation(init, update)
