"""The quickstart's small-scale counterpart of the Inception metrics: a CNN on the digits dataset.

The quickstart dataset (``mdt_jax.data.digits``, 1,797 images, 10 classes) is too small and too
unlike ImageNet for Inception features, so a small CNN trained on it plays the Inception's part:
its penultimate layer (64 features, taken before the ReLU) gives a Frechet distance, its
predictions the class accuracy of class-conditional samples.

API (images are float [N, 16, 16, 1] in [-1, 1], NHWC, numpy or jax arrays)::

    from mdt_jax.evaluation import digits_classifier as dc

    fd = dc.digits_frechet_distance(samples)                    # vs all 1,797 digits images
    fd = dc.digits_frechet_distance(samples, reference_images)  # vs a reference set
    acc = dc.class_accuracy(samples, labels)                    # fraction predicted == labels
    clf = dc.load_digits_classifier()                           # what both use by default
    clf.features(images)   # [N, 64] float32, penultimate layer
    clf.predict(images)    # [N] int32 class ids
    clf.test_accuracy      # accuracy on the held-out 20% of the dataset

``load_digits_classifier(cache_dir=None, seed=0)`` trains the network the first time (15-20
seconds on a 2-core CPU, deterministic for a given seed on a given machine) on a fixed 80%
split of the dataset and saves it to ``cache_dir`` (default ``$MDT_JAX_CACHE`` or ``~/.cache/mdt_jax``);
later calls read that file (kept in memory per process). Frechet distances need at least 2
images and are biased upwards below ~64 (the feature size); a few hundred or more are advised.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mdt_jax import atomic, paths

# the train / test split is fixed, whatever the seed
from mdt_jax.data.digits import load_digits_images, split_indices
from mdt_jax.evaluation.metrics import feature_statistics, frechet_distance
from mdt_jax.models.params import InitKeys, param_name

VERSION = 1
NUM_CLASSES = 10
FEATURE_DIM = 64


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  seed: int = 0
  size: int = 16
  epochs: int = 30
  batch_size: int = 128
  learning_rate: float = 2e-3
  weight_decay: float = 1e-4
  noise_std: float = 0.05  # augmentation: Gaussian noise and +-1 pixel shifts
  version: int = VERSION


class DigitsCNN(nnx.Module):
  """conv16 -> pool -> conv32 -> pool -> conv64 -> dense 64 (features) -> ReLU -> dense 10."""

  def __init__(self, size: int = 16, *, rngs: nnx.Rngs):
    if size % 4:
      raise ValueError(f'image size must be a multiple of 4, got {size}')
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.conv3 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(64 * (size // 4) ** 2, FEATURE_DIM, rngs=rngs)
    self.head = nnx.Linear(FEATURE_DIM, NUM_CLASSES, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """The dense layer before the head, before its ReLU (no dead, constant features)."""
    pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    x = pool(jax.nn.relu(self.conv1(x)))
    x = pool(jax.nn.relu(self.conv2(x)))
    x = jax.nn.relu(self.conv3(x))
    return self.fc(x.reshape(x.shape[0], -1))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(jax.nn.relu(self.features(x)))


def check_images(images, size: int = 16, what: str = 'images') -> np.ndarray:
  """float32 [N, size, size, 1] in [-1, 1], or a ValueError naming what is wrong."""
  arr = np.asarray(images)
  if arr.ndim != 4 or arr.shape[1:] != (size, size, 1):
    raise ValueError(f'{what} must have shape [N, {size}, {size}, 1], got {arr.shape}')
  if not np.issubdtype(arr.dtype, np.floating):
    raise ValueError(
        f'{what} must be floats in [-1, 1], got dtype {arr.dtype} (uint8 images: x / 127.5 - 1)'
    )
  if len(arr) == 0:
    raise ValueError(f'{what} are empty')
  if not np.isfinite(arr).all():
    raise ValueError(f'{what} contain NaN or inf')
  lo, hi = float(arr.min()), float(arr.max())
  if lo < -1.001 or hi > 1.001:
    raise ValueError(
        f'{what} must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] '
        '(clip samples with np.clip(x, -1, 1))'
    )
  return arr.astype(np.float32)


def _augment(key: jax.Array, x: jax.Array, noise_std: float) -> jax.Array:
  k_shift, k_noise = jax.random.split(key)
  n, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
  shifts = jax.random.randint(k_shift, (n, 2), 0, 3)
  crop = jax.vmap(lambda im, s: jax.lax.dynamic_slice(im, (s[0], s[1], 0), (h, w, 1)))
  x = crop(padded, shifts)
  return jnp.clip(x + noise_std * jax.random.normal(k_noise, x.shape), -1.0, 1.0)


def _optimizer(config: TrainConfig) -> optax.GradientTransformation:
  return optax.adamw(config.learning_rate, weight_decay=config.weight_decay)


@functools.lru_cache(maxsize=4)
def _train_step(graphdef, config: TrainConfig):
  """Jitted step for a model structure and config (cached: repeated trainings compile once)."""
  tx = _optimizer(dataclasses.replace(config, seed=0, epochs=0))

  @jax.jit
  def step(params, opt_state, x, y, key):
    x = _augment(key, x, config.noise_std)

    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train(config: TrainConfig = TrainConfig()) -> tuple[DigitsCNN, float]:
  """Trains on the fixed 80% split; returns (model, accuracy on the held-out 20%)."""
  images, labels = load_digits_images(config.size)
  train_idx, test_idx = split_indices(len(images))
  x_train, y_train = images[train_idx], labels[train_idx]
  graphdef, params = nnx.split(DigitsCNN(config.size, rngs=nnx.Rngs(config.seed)))
  opt_state = _optimizer(config).init(params)
  step = _train_step(graphdef, dataclasses.replace(config, seed=0, epochs=0))
  order_rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed)
  steps_per_epoch = len(train_idx) // config.batch_size  # full batches only: one compilation
  for _ in range(config.epochs):
    perm = order_rng.permutation(len(train_idx))
    for i in range(steps_per_epoch):
      key, sub = jax.random.split(key)
      idx = perm[i * config.batch_size : (i + 1) * config.batch_size]
      params, opt_state, _ = step(params, opt_state, x_train[idx], y_train[idx], sub)
  model = nnx.merge(graphdef, params)
  clf = DigitsClassifier(model, config)
  accuracy = float(np.mean(clf.predict(images[test_idx]) == labels[test_idx]))
  return model, accuracy


@functools.lru_cache(maxsize=4)
def _apply_fn(graphdef):
  """Jitted (features, logits) for a model structure (cached across classifier instances)."""

  @jax.jit
  def apply(params, x):
    model = nnx.merge(graphdef, params)
    feats = model.features(x)
    return feats, model.head(jax.nn.relu(feats))

  return apply


class DigitsClassifier:
  """A trained DigitsCNN with batched, jitted ``features`` / ``predict`` on numpy inputs."""

  def __init__(
      self,
      model: DigitsCNN,
      config: TrainConfig,
      test_accuracy: float = float('nan'),
      batch_size: int = 512,
  ):
    self.config, self.test_accuracy, self.batch_size = config, test_accuracy, batch_size
    graphdef, self._params = nnx.split(model)
    self._apply = _apply_fn(graphdef)

  def batches(self, images, what: str = 'images'):
    """(features, logits) of each batch of ``batch_size`` images in order (a short last batch
    is padded to that size when there are several, so that one compiled shape serves)."""
    x = check_images(images, self.config.size, what)
    for start in range(0, len(x), self.batch_size):
      chunk = x[start : start + self.batch_size]
      n = len(chunk)
      if n < self.batch_size and len(x) > self.batch_size:  # keep one compiled batch shape
        chunk = np.concatenate(
            [chunk, np.zeros((self.batch_size - n,) + chunk.shape[1:], chunk.dtype)]
        )
      f, lg = self._apply(self._params, chunk)
      yield np.asarray(f)[:n], np.asarray(lg)[:n]

  def _run(self, images, what: str) -> tuple[np.ndarray, np.ndarray]:
    feats, logits = zip(*self.batches(images, what))
    return np.concatenate(feats), np.concatenate(logits)

  def features(self, images) -> np.ndarray:
    """Penultimate-layer features [N, 64] (float32)."""
    return self._run(images, 'images')[0]

  def predict(self, images) -> np.ndarray:
    """Predicted class ids [N] (int32)."""
    return self._run(images, 'images')[1].argmax(axis=1).astype(np.int32)

  def params(self) -> dict[str, np.ndarray]:
    return {
        param_name(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(self._params)
    }


def default_cache_dir() -> str:
  return paths.cache_dir()


def cache_file(cache_dir: str, config: TrainConfig) -> str:
  return os.path.join(
      cache_dir, f'digits_classifier_v{config.version}_s{config.size}_seed{config.seed}.npz'
  )


def save(clf: DigitsClassifier, path: str) -> None:
  """Writes the classifier (weights, config, test accuracy) to an .npz file."""
  meta = {'config': dataclasses.asdict(clf.config), 'test_accuracy': clf.test_accuracy}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic.save_npz(path, __meta__=np.array(json.dumps(meta)), **clf.params())


def load(path: str, config: TrainConfig | None = None) -> DigitsClassifier:
  """Reads a classifier file; with ``config``, raises ValueError if it was trained otherwise."""
  with np.load(path) as f:
    meta = json.loads(str(f['__meta__']))
    arrays = {k: f[k] for k in f.files if k != '__meta__'}
  saved = TrainConfig(**meta['config'])
  if config is not None and saved != config:
    raise ValueError(f'{path} holds a classifier trained with {saved}, not {config}')
  graphdef, state = nnx.split(nnx.eval_shape(lambda: DigitsCNN(saved.size, rngs=InitKeys(0))))
  flat = []
  for path_, var in nnx.to_flat_state(state):
    name = param_name(path_)
    if name not in arrays or arrays[name].shape != var.get_value().shape:
      raise ValueError(f'{path}: parameter {name} is missing or has the wrong shape')
    flat.append((path_, var.replace(jnp.asarray(arrays[name]))))
  return DigitsClassifier(
      nnx.merge(graphdef, nnx.from_flat_state(flat)), saved, meta['test_accuracy']
  )


@functools.lru_cache(maxsize=4)
def load_digits_classifier(cache_dir: str | None = None, seed: int = 0) -> DigitsClassifier:
  """The classifier for ``seed``: read from the cache, or trained and cached. Processes sharing
  the cache train it once: the others wait for the file."""
  config = TrainConfig(seed=seed)
  path = cache_file(cache_dir or default_cache_dir(), config)
  with atomic.file_lock(path + '.lock'):
    if os.path.isfile(path):
      try:
        return load(path, config)
      except (ValueError, KeyError, OSError) as e:
        warnings.warn(f'retraining the digits classifier: {e}', stacklevel=2)
    model, accuracy = train(config)
    clf = DigitsClassifier(model, config, accuracy)
    try:
      save(clf, path)
    except OSError as e:
      warnings.warn(f'could not cache the digits classifier at {path}: {e}', stacklevel=2)
  return clf


def digits_frechet_distance(
    samples, reference_images=None, classifier: DigitsClassifier | None = None
) -> float:
  """Frechet distance of classifier features: samples vs reference (default: all digits)."""
  clf = classifier or load_digits_classifier()
  x = check_images(samples, clf.config.size, 'samples')
  if len(x) < 2:
    raise ValueError(f'samples: a Frechet distance needs at least 2 images, got {len(x)}')
  return features_frechet_distance(clf.features(x), reference_images, clf)


def features_frechet_distance(
    features, reference_images=None, classifier: DigitsClassifier | None = None
) -> float:
  """`digits_frechet_distance` of samples whose classifier features [N, 64] are given."""
  clf = classifier or load_digits_classifier()
  if reference_images is None:
    reference_images = load_digits_images(clf.config.size)[0]
  ref = check_images(reference_images, clf.config.size, 'reference_images')
  for name, n in (('samples', len(features)), ('reference_images', len(ref))):
    if n < 2:
      raise ValueError(f'{name}: a Frechet distance needs at least 2 images, got {n}')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', UserWarning)  # our own note on small sets, said above
    mu1, sigma1 = feature_statistics(np.asarray(features))
    mu2, sigma2 = feature_statistics(clf.features(ref))
  return frechet_distance(mu1, sigma1, mu2, sigma2)


def class_accuracy(samples, labels, classifier: DigitsClassifier | None = None) -> float:
  """Fraction of samples that the classifier assigns to their conditioning label."""
  clf = classifier or load_digits_classifier()
  x = check_images(samples, clf.config.size, 'samples')
  labels = np.asarray(labels)
  if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f'labels must be integers of shape ({len(x)},), got {labels.dtype} {labels.shape}'
    )
  if labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise ValueError(
        f'labels must lie in 0..{NUM_CLASSES - 1}, got [{labels.min()}, {labels.max()}]'
    )
  return float(np.mean(clf.predict(x) == labels))
