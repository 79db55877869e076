"""An evaluation's clu Collection: the same values as the direct NumPy computations."""

import jax
import numpy as np
import pytest
from clu import metrics as clu_metrics

from mdt_jax.data.digits import load_digits_images
from mdt_jax.evaluation import digits_classifier as dc
from mdt_jax.evaluation import metrics
from mdt_jax.training import eval_metrics


@pytest.fixture(scope='module')
def clf():
  return dc.load_digits_classifier()


def test_digits_scores_equal_the_direct_ones_over_several_classifier_batches(clf):
  images, labels = load_digits_images(16)
  rng = np.random.default_rng(0)
  n = 2 * clf.batch_size + 37  # three batches, the last one padded
  x = np.clip(images[:n] + rng.normal(0, 0.6, images[:n].shape), -1, 1).astype(np.float32)
  y = labels[:n].astype(np.int32).copy()
  wrong = rng.random(n) < 0.3
  y[wrong] = (y[wrong] + 1) % 10  # some samples of another class than their label
  got = eval_metrics.digits(x, y, clf)
  assert got == {
      'digits_fd': dc.digits_frechet_distance(x, classifier=clf),
      'digits_class_accuracy': dc.class_accuracy(x, y, classifier=clf),
  }
  assert 0.0 < got['digits_class_accuracy'] < 1.0  # the merge of the batches is what is checked


def test_class_accuracy_is_clus_accuracy_merged_across_batches():
  rng = np.random.default_rng(1)
  logits, labels = rng.normal(size=(300, 10)), rng.integers(0, 10, 300).astype(np.int32)
  parts = [
      eval_metrics.accuracy(logits[a:b], labels[a:b]) for a, b in ((0, 7), (7, 128), (128, 300))
  ]
  merged = parts[0].merge(parts[1]).merge(parts[2])
  assert isinstance(merged, clu_metrics.Accuracy) and int(merged.count) == 300
  want = float(np.mean(logits.argmax(1) == labels))
  assert eval_metrics.compute({'acc': merged}) == {'acc': want}
  # clu's own Accuracy (float32 on a device) agrees to float32 rounding
  theirs = clu_metrics.Accuracy.from_model_output(logits=logits, labels=labels)
  assert float(theirs.compute()) == pytest.approx(want, rel=1e-6)


def test_features_are_collected_in_order_and_whole_set_values_pass_unchanged():
  rng = np.random.default_rng(2)
  chunks = [
      {'pool': rng.normal(size=(k, 8)).astype(np.float32), 'spatial': rng.normal(size=(k, 3))}
      for k in (5, 1, 9)
  ]
  got = eval_metrics.collect(chunks)
  for name in ('pool', 'spatial'):
    np.testing.assert_array_equal(got[name], np.concatenate([c[name] for c in chunks]))
    assert got[name].dtype == chunks[0][name].dtype
  ref = rng.normal(size=(40, 8))
  mu, sigma = metrics.feature_statistics(got['pool'])
  fid = metrics.frechet_distance(mu, sigma, *metrics.feature_statistics(ref))
  precision, recall = metrics.precision_recall(ref, got['pool'], 3)
  values = {'fid': fid, 'sfid': float('nan'), 'precision': precision, 'recall': recall}
  out = eval_metrics.whole_set(values)
  assert list(out) == list(values) and np.isnan(out.pop('sfid'))
  assert out == {'fid': fid, 'precision': precision, 'recall': recall}
  with pytest.raises(ValueError, match='at least one chunk'):
    eval_metrics.collect([])


def test_the_collection_holds_host_arrays():
  c = eval_metrics.features({'pool': np.ones((2, 3))})
  assert isinstance(c, clu_metrics.CollectingMetric)
  assert all(isinstance(v, np.ndarray) for v in jax.tree.leaves(c))
