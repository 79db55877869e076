"""The train metrics' clu Collection: averages over a logging period, the last learning rate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import metrics as clu_metrics

from mdt_jax.training import train_metrics


def _steps(rng, n):
  return [
      {
          'loss': np.float32(rng.uniform(0, 2)),
          'plain/mse': np.float32(rng.uniform(0, 1)),
          'masked/vb': np.float32(rng.uniform(0, 1)),
          'grad_norm': np.float32(rng.uniform(0, 5)),
          'learning_rate': np.float32(rng.uniform(1e-4, 1e-3)),
      }
      for _ in range(n)
  ]


@pytest.mark.parametrize('n', [1, 3, 100])
def test_a_period_averages_every_metric_but_the_learning_rate(n):
  steps = _steps(np.random.default_rng(n), n)
  got = train_metrics.reduce_steps(steps)
  assert list(got) == list(steps[0])  # the tags, in the step's order
  for tag in ('loss', 'plain/mse', 'masked/vb', 'grad_norm'):
    np.testing.assert_allclose(got[tag], np.mean([s[tag] for s in steps], dtype=np.float64), 1e-6)
  assert got['learning_rate'] == float(steps[-1]['learning_rate'])


def test_a_step_is_a_collection_of_clu_metrics_with_host_fields():
  (step,) = _steps(np.random.default_rng(0), 1)
  c = train_metrics.from_step(step)
  assert isinstance(c, clu_metrics.Collection)
  assert isinstance(c.plain__mse, clu_metrics.Average)
  assert isinstance(c.learning_rate, clu_metrics.LastValue)
  assert all(isinstance(v, (np.ndarray, np.generic)) for v in jax.tree.leaves(c))


def test_clashing_tags_and_an_empty_period_are_refused():
  with pytest.raises(ValueError, match='clashing field names'):
    train_metrics.collection(('a/b', 'a__b'))
  with pytest.raises(ValueError, match='at least one step'):
    train_metrics.reduce_steps([])


def test_clus_std_still_fails_with_this_jax():
  """clu 0.0.12's Std.compute calls jnp.clip(..., a_min=0.0), a keyword jax 0.10 removed
  (docs/design.md, "clu without TensorFlow"); when this passes, Std is usable again."""
  std = clu_metrics.Std.from_model_output(jnp.arange(4.0))
  with pytest.raises(TypeError, match="clip\\(\\) got an unexpected keyword argument 'a_min'"):
    std.compute()
