"""An evaluation's metrics as a clu.metrics Collection.

Per-sample quantities are clu `Average`s: the class accuracy of guided digits samples is a
`clu.metrics.Accuracy` of each of the classifier's batches (its logits against the labels),
merged across the batches. Per-sample features, which the whole-set statistics need together,
are collected across batches by a `clu.metrics.CollectingMetric` (the Inception features of each
sampled chunk). The whole-set statistics themselves (Frechet distances, precision and recall) are
functions of every sample's features at once, not means of per-batch values: each is computed
once from the collected features and enters the evaluation's Collection as a `LastValue`.

Across hosts: the sampler gathers every batch of samples to every process
(`sampling.sampler.call_sharded`), so each process scores the whole set and holds the same
Collection; there is nothing left to reduce. The fields are NumPy (float64 totals, integer
counts), so the computed values equal NumPy's means to the last bit.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import jax
import numpy as np
from clu import metrics as clu_metrics

from mdt_jax.evaluation import digits_classifier as dc


def features(batch: Mapping[str, np.ndarray]) -> clu_metrics.CollectingMetric:
  """One chunk's features (name -> [n, ...]) as a CollectingMetric with host arrays (clu's
  `from_model_output` would copy them to a device first)."""
  return clu_metrics.CollectingMetric({name: (np.asarray(v),) for name, v in batch.items()})


def collect(batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Every chunk's features merged in order: name -> [N, ...]."""
  merged = clu_metrics.CollectingMetric.empty()
  for batch in batches:
    merged = merged.merge(features(batch))
  if not merged.values:
    raise ValueError('no features to collect: an evaluation scores at least one chunk')
  return merged.compute()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> clu_metrics.Accuracy:
  """One batch's class accuracy: an Average of (argmax == label) with host fields."""
  correct = np.asarray(logits).argmax(axis=-1) == np.asarray(labels)
  return clu_metrics.Accuracy(total=np.float64(correct.sum()), count=np.int64(correct.size))


def last_value(value: float) -> clu_metrics.LastValue:
  """A whole-set statistic, computed once, as a metric of count one."""
  return clu_metrics.LastValue(total=np.float64(value), count=np.int64(1))


def compute(metrics: Mapping[str, clu_metrics.Metric]) -> dict[str, float]:
  """The evaluation's Collection of these metrics, computed: name -> float."""
  cls = clu_metrics.Collection.create(**{name: type(m) for name, m in metrics.items()})
  collection = jax.tree.map(np.asarray, cls.empty()).replace(**metrics)
  return {name: float(v) for name, v in collection.compute().items()}


def whole_set(values: Mapping[str, float]) -> dict[str, float]:
  """Whole-set statistics (fid, sfid, precision, recall) through the evaluation's Collection."""
  return compute({name: last_value(v) for name, v in values.items()})


def digits(images: np.ndarray, labels: np.ndarray, clf: dc.DigitsClassifier) -> dict[str, float]:
  """digits_fd (Frechet distance of the classifier's features, whole set) and
  digits_class_accuracy (the Accuracy of each classifier batch, merged)."""
  labels = np.asarray(labels)
  if labels.shape != (len(images),):
    raise ValueError(f'labels must have shape ({len(images)},), got {labels.shape}')
  feats, acc, lo = [], None, 0
  for f, logits in clf.batches(images, 'samples'):
    batch = accuracy(logits, labels[lo : lo + len(f)])
    acc = batch if acc is None else acc.merge(batch)
    feats.append(f)
    lo += len(f)
  fd = dc.features_frechet_distance(np.concatenate(feats), classifier=clf)
  return compute({'digits_fd': last_value(fd), 'digits_class_accuracy': acc})
