"""The digits classifier: accuracy, determinism, cache, Frechet distance and class accuracy."""

import dataclasses
import os
import threading
import time
import warnings

import numpy as np
import pytest
from flax import nnx
from scipy import linalg

from mdt_jax.data import digits
from mdt_jax.data.digits import load_digits_images
from mdt_jax.evaluation import digits_classifier as dc


@pytest.fixture(scope='session')
def cache_dir():
  """The session's cache folder (conftest.py): the classifier trained here serves every test."""
  return dc.default_cache_dir()


@pytest.fixture(scope='session')
def clf(cache_dir):
  return dc.load_digits_classifier(cache_dir=cache_dir, seed=0)


@pytest.fixture(scope='session')
def data():
  images, labels = load_digits_images(16)
  train_idx, test_idx = dc.split_indices(len(images))
  return images, labels, train_idx, test_idx


def test_digits_are_scikit_learns_read_without_importing_it(monkeypatch):
  from sklearn.datasets import load_digits

  want = load_digits()
  images, labels = digits._digits_8x8()
  np.testing.assert_array_equal(images, want.images)
  np.testing.assert_array_equal(labels, want.target)
  # a wheel without the file: scikit-learn's loader, same arrays
  monkeypatch.setattr(digits.os.path, 'isfile', lambda p: False)
  images, labels = digits._digits_8x8()
  np.testing.assert_array_equal(images, want.images)
  np.testing.assert_array_equal(labels, want.target)


def test_8x8_images_upsampled_are_the_16x16_dataset(clf, data):
  """An 8x8 run's samples are scored upsampled (training/samples.evaluate_digits): the 8x8
  digits so upsampled are the classifier's 16x16 digits bit for bit, and score as they do."""
  small, _ = load_digits_images(8)
  np.testing.assert_array_equal(digits.upsample(small, 16), data[0])
  images, labels, _, test_idx = data
  up = digits.upsample(small[test_idx], 16)
  assert dc.class_accuracy(up, labels[test_idx], clf) == clf.test_accuracy


def test_held_out_accuracy(clf, data):
  images, labels, train_idx, test_idx = data
  assert len(test_idx) == 359 and not set(train_idx) & set(test_idx)
  assert clf.test_accuracy > 0.95
  assert dc.class_accuracy(images[test_idx], labels[test_idx], clf) == clf.test_accuracy
  assert clf.features(images[:5]).shape == (5, dc.FEATURE_DIM)
  assert clf.predict(images[:5]).dtype == np.int32


def test_cache_file_round_trip(clf, cache_dir, data):
  path = dc.cache_file(cache_dir, clf.config)
  assert os.path.isfile(path)
  loaded = dc.load(path, clf.config)
  images = data[0][:600]  # more than one batch of 512: padded last batch
  np.testing.assert_array_equal(loaded.features(images), clf.features(images))
  assert loaded.test_accuracy == clf.test_accuracy
  with pytest.raises(ValueError, match='trained with'):
    dc.load(path, dataclasses.replace(clf.config, seed=1))


def test_training_is_deterministic():
  cfg = dc.TrainConfig(seed=3, epochs=1)
  (m1, a1), (m2, a2) = dc.train(cfg), dc.train(cfg)
  p1, p2 = dc.DigitsClassifier(m1, cfg).params(), dc.DigitsClassifier(m2, cfg).params()
  assert a1 == a2
  for k in p1:
    np.testing.assert_array_equal(p1[k], p2[k])


def test_processes_sharing_the_cache_train_once(tmp_path, monkeypatch):
  """Two loads at once (threads here, processes in a test run) with an empty cache: the second
  waits for the first's file instead of training a second classifier."""
  trained = []

  def slow_train(config):
    trained.append(config)
    time.sleep(1.0)  # long enough for the other load to reach the lock
    return dc.DigitsCNN(config.size, rngs=nnx.Rngs(0)), 0.5  # untrained: only its file matters

  monkeypatch.setattr(dc, 'train', slow_train)
  load = dc.load_digits_classifier.__wrapped__  # not the per-process memo
  results = []
  threads = [
      threading.Thread(target=lambda: results.append(load(str(tmp_path), 0))) for _ in range(2)
  ]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(trained) == 1 and len(results) == 2
  images = np.zeros((2, 16, 16, 1), np.float32)
  np.testing.assert_array_equal(results[0].features(images), results[1].features(images))


def test_frechet_distance(clf, data):
  images, _, train_idx, test_idx = data
  real = dc.digits_frechet_distance(images[test_idx], images[train_idx], clf)
  # independent: SciPy sqrtm on the classifier features
  a, b = clf.features(images[test_idx]).astype(np.float64), clf.features(images[train_idx])
  s1, s2 = np.cov(a, rowvar=False), np.cov(b.astype(np.float64), rowvar=False)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', linalg.LinAlgWarning)  # dead ReLU units: singular covs
    root = linalg.sqrtm(s1 @ s2).real
  want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2) - 2 * np.trace(root)
  assert real == pytest.approx(want, rel=1e-5, abs=1e-4)
  assert abs(dc.digits_frechet_distance(images[:300], images[:300], clf)) < 1e-4
  noise = np.random.default_rng(0).uniform(-1, 1, (300, 16, 16, 1)).astype(np.float32)
  blurred_noise = dc.digits_frechet_distance(noise, images[train_idx], clf)
  assert blurred_noise > 10 * real
  # default reference: the whole dataset
  assert dc.digits_frechet_distance(images[test_idx], classifier=clf) == pytest.approx(
      dc.digits_frechet_distance(images[test_idx], images, clf)
  )


def test_class_accuracy_of_wrong_labels(clf, data):
  images, labels, _, test_idx = data
  wrong = (labels[test_idx] + 1) % 10
  assert dc.class_accuracy(images[test_idx], wrong, clf) < 0.05


def test_bad_inputs(clf, data):
  images, labels = data[0][:20], data[1][:20]
  with pytest.raises(ValueError, match=r'\[N, 16, 16, 1\]'):
    clf.features(images[..., 0])
  with pytest.raises(ValueError, match='dtype uint8'):
    clf.predict(((images + 1) * 127.5).astype(np.uint8))
  with pytest.raises(ValueError, match=r'\[-1, 1\]'):
    dc.class_accuracy(images * 2, labels, clf)
  with pytest.raises(ValueError, match='NaN'):
    clf.features(np.full_like(images, np.nan))
  with pytest.raises(ValueError, match='at least 2'):
    dc.digits_frechet_distance(images[:1], images, clf)
  with pytest.raises(ValueError, match='integers of shape'):
    dc.class_accuracy(images, labels[:5], clf)
  with pytest.raises(ValueError, match=r'0\.\.9'):
    dc.class_accuracy(images, labels + 10, clf)
