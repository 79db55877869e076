"""Where XLA:CPU and the accelerators want different code for the same computation, the choice is
made here, once, from the backend the model is traced for.

XLA:CPU wants (measured in BENCHMARKS.md, section "The train step on the CPU"):
- dense layers on 2-D ``[tokens, features]`` operands: the weight gradient is then a plain
  transposed-operand matrix product; on ``[batch, tokens, features]`` operands XLA:CPU
  canonicalises it with a transpose of the activations that it fuses into their producers;
- attention written out with einsums (`mdt_jax.models.layers.attention_einsum`) rather than
  `jax.nn.dot_product_attention`'s XLA path.
Accelerators keep the general code (cuDNN / TPU kernels through `jax.nn.dot_product_attention`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import jax

_override: list[bool] = []


def xla_cpu() -> bool:
  """True when the model is traced for XLA:CPU (the default backend is the CPU)."""
  if _override:
    return _override[-1]
  return jax.default_backend() == 'cpu'


@contextlib.contextmanager
def assume_xla_cpu(value: bool) -> Iterator[None]:
  """Trace the code of the other backend (for tests: both variants compute the same thing)."""
  _override.append(bool(value))
  try:
    yield
  finally:
    _override.pop()
