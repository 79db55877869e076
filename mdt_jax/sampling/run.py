"""A whole sampling run written in shards: resumable, merged into the ADM evaluator's .npz."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Callable, Iterator

import jax
import numpy as np

from mdt_jax import atomic, paths
from mdt_jax.images import save_grid, to_uint8
from mdt_jax.progress import Progress
from mdt_jax.sampling import labels as labels_lib
from mdt_jax.sampling.sampler import Sampler, generate

SHARD_DIR = 'shards'
RUN_FILE = 'run.json'


def _shard_path(out_dir: str, k: int) -> str:
  return os.path.join(out_dir, SHARD_DIR, f'shard_{k:05d}.npz')


@contextlib.contextmanager
def _load_npz(path: str) -> Iterator[np.lib.npyio.NpzFile]:
  """np.load of an .npz, local or on object storage."""
  with paths.path(path).open('rb') as f, np.load(f) as npz:
    yield npz


def _shard_done(path: str, indices: np.ndarray, labels: np.ndarray) -> bool:
  if not paths.path(path).is_file():
    return False
  try:
    with _load_npz(path) as f:
      return (
          np.array_equal(f['indices'], indices)
          and np.array_equal(f['arr_1'], labels)
          and f['arr_0'].shape[0] == indices.size
      )
  except Exception:  # unreadable: sample it again
    return False


def _check_run_file(out_dir: str, settings: dict) -> None:
  """Shards of one output folder must all come from the same settings."""
  path = paths.path(out_dir) / RUN_FILE
  if path.is_file():
    old = json.loads(path.read_text())
    if 'guided_channels' in old.get('sampler', {}):  # the older name of the same setting
      old['sampler']['guidance_channels'] = old['sampler'].pop('guided_channels')
    if old != settings:
      diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
      raise ValueError(
          f'{out_dir} holds samples of a run with other settings ({diff}); use a '
          'new --out folder or the same settings'
      )
  elif jax.process_index() == 0:
    atomic.write_text(os.fspath(path), json.dumps(settings, indent=2))


def run_sampling(
    sampler: Sampler,
    *,
    out_dir: str,
    num_samples: int,
    labels: str | list[int] = 'uniform',
    seed: int = 0,
    batch_size: int = 64,
    shard_size: int = 1000,
    postprocess: Callable = to_uint8,
    grid_size: int = 64,
    run_info: dict | None = None,
) -> str:
  """Sample `num_samples` images into OUT/shards, skip finished shards, merge OUT/samples.npz.

  samples.npz: arr_0 uint8 [N, H, W, 3], arr_1 int labels [N] (the ADM evaluator layout);
  OUT/samples_grid.png shows the first `grid_size` samples.
  """
  if num_samples < 1 or shard_size < 1:
    raise ValueError(f'num_samples and shard_size must be >= 1, got {num_samples}, {shard_size}')
  all_labels = labels_lib.make_labels(labels, num_samples, sampler.num_classes, seed)
  settings = dict(
      sampler=sampler.config.record(),
      seed=seed,
      labels=labels if isinstance(labels, str) else list(map(int, labels)),
      shard_size=shard_size,
      **(run_info or {}),
  )
  settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back from the file
  (paths.path(out_dir) / SHARD_DIR).mkdir(parents=True, exist_ok=True)
  _check_run_file(out_dir, settings)

  num_shards = -(-num_samples // shard_size)
  with Progress(num_samples, 'sampling', enabled=jax.process_index() == 0) as bar:
    for k in range(num_shards):
      lo, hi = k * shard_size, min(num_samples, (k + 1) * shard_size)
      idx, y = np.arange(lo, hi), all_labels[lo:hi]
      path = _shard_path(out_dir, k)
      if _shard_done(path, idx, y):
        logging.info('shard %d/%d already done, skipped', k + 1, num_shards)
        bar.skip(hi - lo)
        continue
      images = generate(
          sampler,
          y,
          seed=seed,
          batch_size=batch_size,
          start=lo,
          postprocess=postprocess,
          log_every=0,  # the bar (or its log lines) shows the batches
          on_batch=bar.update,
      )
      if jax.process_index() == 0:
        atomic.save_npz(path, arr_0=images, arr_1=y, indices=idx)

  out = os.path.join(out_dir, 'samples.npz')
  if jax.process_index() == 0:
    images, ys = [], []
    for k in range(num_shards):
      with _load_npz(_shard_path(out_dir, k)) as f:
        images.append(f['arr_0'])
        ys.append(f['arr_1'])
    images = np.concatenate(images)
    atomic.save_npz(out, arr_0=images, arr_1=np.concatenate(ys))
    if grid_size:
      save_grid(images[:grid_size], os.path.join(out_dir, 'samples_grid.png'))
    logging.info('wrote %s: %s uint8 images and labels', out, images.shape)
  return out
