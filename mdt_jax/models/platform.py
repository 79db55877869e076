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

`platform_dependent` traces every branch (and differentiates every branch) although only one is
compiled. Where a jitted function's devices are known before it is traced (the train step over its
mesh, the samplers' shard_map), `traced_for` traces only their platform's branch: the micro test
model's train step lowers in about half the time (BENCHMARKS.md "Start-up of a training process").
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Callable, Iterable, Iterator

import jax

BACKENDS = ('cpu', 'tpu', 'default')
# Profiles and traffic reports name an op by the innermost frame of mdt_jax code; this module only
# dispatches, so they look past its frames to the layer that called `by_backend`.
DISPATCH_SOURCE = 'mdt_jax' + os.sep + 'models' + os.sep + 'platform.py'
# .assumed: this thread's stack of (backend, device kind or None) of assume_backend
_local = threading.local()


def by_backend(*args, cpu: Callable | None = None, tpu: Callable | None = None, default: Callable):
  """``branch(*args)`` of the platform the computation is lowered for; `default` where a
  platform has no branch of its own. All branches must compute the same thing."""
  branches = {'cpu': cpu, 'tpu': tpu}
  backend, _ = _assumption()
  if backend is not None:
    return (branches.get(backend) or default)(*args)
  given = {k: f for k, f in branches.items() if f is not None}
  return jax.lax.platform_dependent(*args, default=default, **given)


def _assumed() -> list[tuple[str | None, str | None]]:
  if not hasattr(_local, 'assumed'):
    _local.assumed = []
  return _local.assumed


def _assumption() -> tuple[str | None, str | None]:
  """(backend, device kind) of the innermost `assume_backend`; (None, None) outside any."""
  assumed = _assumed()
  return assumed[-1] if assumed else (None, None)


@contextlib.contextmanager
def assume_backend(name: str | None, device_kind: str | None = None) -> Iterator[None]:
  """Within this context (in this thread) `by_backend` traces `name`'s branch only, whatever the
  platform, and `device_kind()` is `device_kind`: `traced_for`, and tests (every branch computes
  what the others compute). `name` None: every branch again (`jax.lax.platform_dependent`),
  whatever an enclosing context assumed."""
  if name is not None and name not in BACKENDS:
    raise ValueError(f'backend {name!r}: expected one of {BACKENDS} or None')
  _assumed().append((name, device_kind))
  try:
    yield
  finally:
    _assumed().pop()


def backend_of(devices: Iterable[jax.Device]) -> str | None:
  """`by_backend`'s branch for computations on `devices`: 'cpu', 'tpu' or 'default' (GPUs);
  None where they are of more than one platform."""
  names = {d.platform for d in devices}
  if len(names) != 1:
    return None
  name = names.pop()
  return name if name in ('cpu', 'tpu') else 'default'


def device_kind() -> str | None:
  """The kind of device (``'TPU v4'``, ``'TPU v5 lite'``, ...) being traced for: `traced_for`'s
  devices' (a TPU topology compiled from a CPU host included), else the default devices' where
  they are TPUs; None where unknown (then the TPU branches assume a chip that fits them)."""
  backend, kind = _assumption()
  if backend is not None:
    return kind
  return jax.devices()[0].device_kind if jax.default_backend() == 'tpu' else None


def traced_for(devices: Iterable[jax.Device], fn: Callable) -> Callable:
  """`fn`, tracing only the `by_backend` branches of the platform of `devices` (and with their
  `device_kind()`): for functions that are only ever compiled for those devices (a jit with their
  shardings, a shard_map over their mesh), whose other branches would be traced and dropped."""
  devices = list(devices)
  backend = backend_of(devices)
  if backend is None:
    return fn
  kinds = {d.device_kind for d in devices}
  kind = kinds.pop() if len(kinds) == 1 else None

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with assume_backend(backend, kind):
      return fn(*args, **kwargs)

  return traced
