"""The one place where code is chosen by backend: where XLA:CPU, the TPU and the GPU want
different code for the same computation, `by_backend` picks it for the platform the computation
is lowered for (`jax.lax.platform_dependent`: within a jit only that platform's branch is
compiled, and a TPU topology compiled from a CPU host gets the TPU's code).

Its users:
- `mdt_jax.models.layers.Dense`: on XLA:CPU dense layers multiply 2-D ``[rows, features]``
  operands (the weight gradient is then a plain transposed-operand matrix product; on
  ``[batch, tokens, features]`` operands XLA:CPU canonicalises it with a transpose of the
  activations that it fuses into their producers);
- `mdt_jax.models.attention.attend`: on XLA:CPU attention written out with einsums, on a TPU the
  fused Pallas kernel, elsewhere (GPU) `jax.nn.dot_product_attention`;
- `mdt_jax.models.layers.RelativePositionBias`: on a TPU one-hot contractions (gathers and
  scatters are while loops there), elsewhere the table's gather.
Measured in BENCHMARKS.md, section "The train step on the CPU".
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import jax

BACKENDS = ('cpu', 'tpu', 'default')
# Profiles and traffic reports name an op by the innermost frame of mdt_jax code; this module only
# dispatches, so they look past its frames to the layer that called `by_backend`.
DISPATCH_SOURCE = 'mdt_jax' + os.sep + 'models' + os.sep + 'platform.py'
_assumed: list[str] = []


def by_backend(*args, cpu: Callable | None = None, tpu: Callable | None = None, default: Callable):
  """``branch(*args)`` of the platform the computation is lowered for; `default` where a
  platform has no branch of its own. All branches must compute the same thing."""
  branches = {'cpu': cpu, 'tpu': tpu}
  if _assumed:
    return (branches.get(_assumed[-1]) or default)(*args)
  given = {k: f for k, f in branches.items() if f is not None}
  return jax.lax.platform_dependent(*args, default=default, **given)


@contextlib.contextmanager
def assume_backend(name: str) -> Iterator[None]:
  """Within this context `by_backend` traces `name`'s branch only, whatever the platform (tests:
  every branch computes what the others compute)."""
  if name not in BACKENDS:
    raise ValueError(f'backend {name!r}: expected one of {BACKENDS}')
  _assumed.append(name)
  try:
    yield
  finally:
    _assumed.pop()
