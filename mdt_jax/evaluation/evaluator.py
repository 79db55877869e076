"""Sample-batch evaluation as the ADM evaluator does it: IS, FID, sFID, precision, recall.

Files:

* samples: an .npz in the ADM layout, ``arr_0`` uint8 [N, H, W, 3] (optional ``arr_1`` labels [N]);
* reference: an ADM reference batch (``arr_0`` images; ``VIRTUAL_imagenet256_labeled.npz`` also
  has precomputed ``mu``, ``sigma``, ``mu_s``, ``sigma_s``, which then give FID / sFID while the
  images give the features for precision / recall, as in the ADM evaluator), or a statistics file
  written by ``save_statistics`` (``mdt_jax.evaluate --save_stats``).

Reference statistics are cached next to the reference (or in ``cache_dir``) in the statistics
file format, keyed by the Inception weights' hash and the reference's size and mtime.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
import zipfile

import numpy as np

from mdt_jax import atomic
from mdt_jax.evaluation import metrics
from mdt_jax.evaluation.features import FeatureExtractor, NpzImages
from mdt_jax.evaluation.inception import load_inception, weights_fingerprint

STATS_FORMAT = 'mdt_jax.fid_stats.v1'
ADM_STAT_KEYS = ('mu', 'sigma', 'mu_s', 'sigma_s')


@dataclasses.dataclass
class Statistics:
  """Feature statistics of an image set (pool: FID, spatial: sFID) and its pool features."""

  mu: np.ndarray
  sigma: np.ndarray
  mu_s: np.ndarray
  sigma_s: np.ndarray
  pool: np.ndarray | None = None  # [N, 2048], for precision / recall
  num_images: int = 0
  weights: str = ''  # fingerprint of the Inception weights used
  source: str = ''  # fingerprint of the file the statistics come from


def statistics_from_features(
    feats: dict[str, np.ndarray], weights: str = '', source: str = ''
) -> Statistics:
  """Statistics of features {'pool', 'spatial'}."""
  mu, sigma = metrics.feature_statistics(feats['pool'])
  mu_s, sigma_s = metrics.feature_statistics(feats['spatial'])
  return Statistics(
      mu,
      sigma,
      mu_s,
      sigma_s,
      feats['pool'].astype(np.float32),
      len(feats['pool']),
      weights,
      source,
  )


def save_statistics(path: str, stats: Statistics) -> None:
  """Writes statistics as an .npz that ``--reference`` accepts."""
  arrays = {k: v for k, v in dataclasses.asdict(stats).items() if isinstance(v, np.ndarray)}
  atomic.save_npz(
      path,
      format=np.array(STATS_FORMAT),
      num_images=np.array(stats.num_images),
      weights=np.array(stats.weights),
      source=np.array(stats.source),
      **arrays,
  )


def load_statistics(path: str) -> Statistics:
  """Reads a statistics file written by ``save_statistics``."""
  with np.load(path) as f:
    if 'format' not in f.files or str(f['format']) != STATS_FORMAT:
      raise ValueError(f'{path!r} is not a statistics file of format {STATS_FORMAT}')
    return Statistics(
        f['mu'],
        f['sigma'],
        f['mu_s'],
        f['sigma_s'],
        f['pool'] if 'pool' in f.files else None,
        int(f['num_images']),
        str(f['weights']),
        str(f['source']),
    )


def _npz_names(path: str) -> set[str]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no such file: {path!r}')
  if not zipfile.is_zipfile(path):
    raise ValueError(f'{path!r} is not an .npz file')
  with zipfile.ZipFile(path) as z:
    return {n[:-4] for n in z.namelist() if n.endswith('.npy')}


def open_images(path: str, what: str) -> NpzImages:
  """arr_0 of an ADM-layout .npz, checked from its header: uint8 [N, H, W, 3]."""
  names = _npz_names(path)
  if 'arr_0' not in names:
    raise ValueError(
        f'{what} {path!r} has arrays {sorted(names)}; expected arr_0 with uint8 '
        'images [N, H, W, 3] (ADM layout)'
    )
  images = NpzImages(path, 'arr_0')
  shape, dtype = images.shape, images.dtype
  if dtype != np.uint8:
    raise ValueError(
        f'{what} {path!r}: arr_0 has dtype {dtype}, expected uint8 in [0, 255] '
        '(from [-1, 1] floats: np.clip(np.round((x + 1) * 127.5), 0, 255)'
        '.astype(np.uint8))'
    )
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f'{what} {path!r}: arr_0 has shape {shape}, expected [N, H, W, 3]')
  if min(shape[1:3]) < 8:
    raise ValueError(f'{what} {path!r}: images are {shape[1]}x{shape[2]}, expected at least 8x8')
  if shape[0] < 2:
    raise ValueError(f'{what} {path!r} holds {shape[0]} image(s); the covariance needs at least 2')
  return images


def reference_kind(path: str) -> str:
  """'stats' (a statistics file) or 'adm' (an ADM reference batch); raises for anything else."""
  names = _npz_names(path)
  if 'format' in names:
    load_statistics(path)  # checks the format tag
    return 'stats'
  present = [k for k in ADM_STAT_KEYS if k in names]
  if present and len(present) != len(ADM_STAT_KEYS):
    raise ValueError(f'reference {path!r} has {present} but not all of {list(ADM_STAT_KEYS)}')
  if 'arr_0' in names:
    open_images(path, 'reference')
    return 'adm'
  if present:
    return 'adm'
  raise ValueError(
      f'reference {path!r} has arrays {sorted(names)}; expected an ADM reference '
      'batch (arr_0 uint8 [N, H, W, 3], optionally mu, sigma, mu_s, sigma_s) or a '
      'statistics file written by `python -m mdt_jax.evaluate --save_stats`'
  )


def _file_id(path: str) -> str:
  st = os.stat(path)
  return f'{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}'


def cache_path(reference: str, weights_fp: str, cache_dir: str | None = None) -> str:
  folder = cache_dir or os.path.dirname(os.path.abspath(reference))
  return os.path.join(folder, f'{os.path.basename(reference)}.inception-{weights_fp[:12]}.npz')


def reference_statistics(
    reference: str,
    extractor: FeatureExtractor,
    weights_fp: str,
    cache_dir: str | None = None,
    progress: bool = True,
) -> Statistics:
  """Statistics of a reference file, from the cache when it is current."""
  if reference_kind(reference) == 'stats':
    stats = load_statistics(reference)
    if stats.weights and stats.weights != weights_fp:
      warnings.warn(
          f'{reference!r} was computed with other Inception weights '
          f'({stats.weights} vs {weights_fp})',
          stacklevel=2,
      )
    return stats
  cached = cache_path(reference, weights_fp, cache_dir)
  if os.path.isfile(cached):
    stats = load_statistics(cached)
    if stats.weights == weights_fp and stats.source == _file_id(reference):
      if progress:
        print(f'[inception] reference statistics from cache {cached}', file=sys.stderr)
      return stats
  names = _npz_names(reference)
  if 'arr_0' in names:
    images = open_images(reference, 'reference')
    feats = extractor(images.batches(extractor.batch_size), len(images), 'reference')
    stats = statistics_from_features(feats, weights_fp, _file_id(reference))
  else:
    stats = Statistics(*(None,) * 4, weights=weights_fp, source=_file_id(reference))
  if all(k in names for k in ADM_STAT_KEYS):  # precomputed, as the ADM evaluator prefers
    with np.load(reference) as f:
      stats.mu, stats.sigma, stats.mu_s, stats.sigma_s = (f[k] for k in ADM_STAT_KEYS)
  try:
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    save_statistics(cached, stats)
  except OSError as e:
    warnings.warn(f'could not cache reference statistics at {cached}: {e}', stacklevel=2)
  return stats


def check_inputs(samples: str, reference: str) -> NpzImages:
  """Checks the sample batch (arr_0 images, optional arr_1 labels) and the reference layout."""
  images = open_images(samples, 'samples')
  if 'arr_1' in _npz_names(samples):
    labels = NpzImages(samples, 'arr_1')
    if labels.shape != (len(images),) or labels.dtype.kind not in 'iu':
      raise ValueError(
          f'samples {samples!r}: arr_1 must hold integer labels [{len(images)}], '
          f'got {labels.dtype} {list(labels.shape)}'
      )
  if reference_kind(reference) == 'adm' and 'arr_0' in _npz_names(reference):
    ref = open_images(reference, 'reference')
    if ref.shape[1:3] != images.shape[1:3]:
      raise ValueError(
          f'samples {samples!r} are {images.shape[1]}x{images.shape[2]} images but '
          f'the reference batch {reference!r} holds {ref.shape[1]}x{ref.shape[2]} '
          'ones; metrics against a reference of another resolution are not '
          "comparable (use the reference batch of the samples' resolution)"
      )
  return images


def evaluate(
    samples: str,
    reference: str,
    weights: str,
    *,
    batch_size: int = 256,
    cache_dir: str | None = None,
    save_stats: str | None = None,
    split_size: int = 5000,
    k: int = 3,
    fid_method: str = 'eigh',
    progress: bool = True,
) -> dict:
  """Metrics of an ADM sample batch against a reference; checks both files before any work."""
  if fid_method not in ('eigh', 'sqrtm'):
    raise ValueError(f"fid_method must be 'eigh' or 'sqrtm', got {fid_method!r}")
  sample_images = check_inputs(samples, reference)
  model = load_inception(weights)
  fp = weights_fingerprint(weights)
  extractor = FeatureExtractor(model, batch_size)
  ref = reference_statistics(reference, extractor, fp, cache_dir, progress)
  feats = extractor(
      sample_images.batches(extractor.batch_size), len(sample_images), 'samples', progress
  )
  stats = statistics_from_features(feats, fp, _file_id(samples))
  if save_stats:
    save_statistics(save_stats, stats)
  notes = []
  result = {
      'samples': samples,
      'reference': reference,
      'inception_weights': weights,
      'num_samples': stats.num_images,
      'num_reference': ref.num_images,
  }
  if 'logits' in feats:
    result['inception_score'] = metrics.inception_score(feats['logits'], split_size)
  else:
    result['inception_score'] = None
    notes.append(
        'Inception Score: the weights file has no 1008-class head (convert with --logits_from)'
    )
  if ref.mu is not None:
    result['fid'] = metrics.frechet_distance(
        stats.mu, stats.sigma, ref.mu, ref.sigma, method=fid_method
    )
    result['sfid'] = metrics.frechet_distance(
        stats.mu_s, stats.sigma_s, ref.mu_s, ref.sigma_s, method=fid_method
    )
  if ref.pool is not None and len(ref.pool) > k and stats.num_images > k:
    result['precision'], result['recall'] = metrics.precision_recall(ref.pool, feats['pool'], k)
  else:
    result['precision'] = result['recall'] = None
    notes.append(f'precision / recall: need more than k={k} reference images and samples')
  result['notes'] = notes
  return result


def format_table(result: dict) -> str:
  """Plain-text table of the metrics."""
  rows = [
      ('Inception Score', 'inception_score'),
      ('FID', 'fid'),
      ('sFID', 'sfid'),
      ('Precision', 'precision'),
      ('Recall', 'recall'),
  ]
  lines = [
      f'samples: {result["num_samples"]}  reference: {result["num_reference"]}',
      f'{"metric":<16} value',
  ]
  for name, key in rows:
    v = result.get(key)
    lines.append(f'{name:<16} {"n/a" if v is None else f"{v:.4f}"}')
  lines += [f'note: {n}' for n in result.get('notes', [])]
  return '\n'.join(lines)
