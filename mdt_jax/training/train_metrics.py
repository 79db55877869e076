"""The train step's metrics as a clu.metrics Collection, reduced over each logging period.

Across hosts: the batch is sharded over every process and the step takes its losses' means over
the whole global batch inside the compiled program (one XLA all-reduce), so each process holds
the global value of every metric. Across steps: each step's values become a Collection
(`Average` for the losses and the gradient norm, `LastValue` for the learning rate), merged
step by step and computed when the loop logs. The values arrive on the host (one transfer per
logging period, which the non-finite-loss check needs anyway); building the metrics there from
their ``total``/``count`` fields keeps the merges in NumPy, with no device op per step.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import numpy as np
from clu import metrics as clu_metrics

LAST_VALUE = frozenset({'learning_rate'})  # the value at the period's last step


def field_name(tag: str) -> str:
  """The Collection's field for a metric's TensorBoard tag ('plain/loss' -> 'plain__loss')."""
  return tag.replace('/', '__')


@functools.lru_cache(maxsize=None)
def collection(tags: tuple[str, ...]) -> type[clu_metrics.Collection]:
  """The Collection class of these metric tags."""
  kinds = {field_name(t): _kind(t) for t in tags}
  if len(kinds) != len(tags):
    raise ValueError(f'metric tags {tags} map to clashing field names {sorted(kinds)}')
  return clu_metrics.Collection.create(**kinds)


@functools.lru_cache(maxsize=None)
def _empty(tags: tuple[str, ...]) -> clu_metrics.Collection:
  """An empty Collection of these tags with NumPy fields (its merges then stay on the host)."""
  return jax.tree.map(np.asarray, collection(tags).empty())


def _kind(tag: str) -> type[clu_metrics.Metric]:
  return clu_metrics.LastValue if tag in LAST_VALUE else clu_metrics.Average


def from_step(values: Mapping[str, np.ndarray]) -> clu_metrics.Collection:
  """One step's host values (scalars) as a Collection, each metric of count one."""
  one = np.int32(1)
  fields = {
      field_name(tag): _kind(tag)(total=np.float32(value), count=one)
      for tag, value in values.items()
  }
  return _empty(tuple(values)).replace(**fields)


def reduce_steps(steps: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
  """The period's metrics, tag -> value: the steps' Collections merged, then computed."""
  if not steps:
    raise ValueError('no steps to reduce: a logging period holds at least one step')
  merged = functools.reduce(lambda a, b: a.merge(b), map(from_step, steps))
  computed = merged.compute()
  return {tag: float(computed[field_name(tag)]) for tag in steps[0]}
