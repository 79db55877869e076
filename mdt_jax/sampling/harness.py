"""The one sampling loop. A sampler is its `Steps`: a grid of noise levels 0 (pure noise) ..
num_steps (data) and the step function between neighbours; DDPM, DDIM and DPM-Solver++ are
built in loops.py, Euler, Heun and Euler-Maruyama in flow_loops.py. Guidance wraps the model
(guidance.py) and never the loop; inpainting is this loop with a rule around every step
(inpaint.py: the known region put back).

Randomness comes in through a `NoiseFn`: stream -> per-sample standard normals shaped like x.
Step i draws stream i + 1 (stream 0 is the starting noise), so a sample's draws do not depend on
its batch or on the number of devices (loops.py: `per_sample_normal`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

Array = jax.Array
EvalFn = Callable[[Array, Array], Array]  # (x, model time [B]) -> model output (guided)
NoiseFn = Callable[[int | Array], Array]  # stream -> per-sample normals like x
# (eval_fn, x, i, state, noise or None) -> (x at level i + 1, state)
StepFn = Callable[[EvalFn, Array, Array, Any, Array | None], tuple[Array, Any]]
Carry = tuple[Array, Any]  # (x, the sampler's state: e.g. DPM-Solver++'s last x0 prediction)
# (take, carry, i) -> carry: a rule around step i; take(carry, stream) is the sampler's step i
# with the draws of that stream
Rule = Callable[[Callable[[Carry, int | Array], Carry], Carry, Array], Carry]


def _no_state(x: Array) -> tuple:
  return ()


@dataclasses.dataclass(frozen=True)
class Steps:
  """One sampler: `num_steps` steps, step i from noise level i to level i + 1.

  noisy: whether a step takes noise (ancestral DDPM, DDIM with eta > 0, Euler-Maruyama).
  init_state: the state of a multistep sampler before its first step.
  noised, back: the forward process at the grid's levels, for rules that put known data in
    (inpainting); None for a sampler without one (DPM-Solver++: multistep).
    noised(x0, i, noise): data x0 at level i + 1; back(x, i, noise): x at level i + 1 noised
    back to level i.
  """

  num_steps: int
  step: StepFn
  noisy: bool
  init_state: Callable[[Array], Any] = _no_state
  noised: Callable[[Array, Array, Array], Array] | None = None
  back: Callable[[Array, Array, Array], Array] | None = None


def run_steps(
    steps: Steps,
    eval_fn: EvalFn,
    carry: Carry,
    noise: NoiseFn,
    start: int | Array = 0,
    stop: int | Array | None = None,
    rule: Rule | None = None,
) -> Carry:
  """Steps start .. stop - 1 (default: all) from carry = (x, state), one lax.fori_loop."""

  def take(i):
    def step(carry: Carry, stream) -> Carry:
      x, state = carry
      return steps.step(eval_fn, x, i, state, noise(stream) if steps.noisy else None)

    return step

  def body(i, carry):
    if rule is None:
      return take(i)(carry, i + 1)
    return rule(take(i), carry, i)

  stop = steps.num_steps if stop is None else stop
  return jax.lax.fori_loop(start, stop, body, carry)


def sample_loop(steps: Steps, eval_fn: EvalFn, x: Array, noise: NoiseFn) -> Array:
  """Every step from x = pure noise (level 0) to the sample."""
  return run_steps(steps, eval_fn, (x, steps.init_state(x)), noise)[0]
