"""Encode an image dataset with the SD VAE into ArrayRecord shards of latent records.

Each image of a source (`mdt_jax.data.image_sources`: a folder or a TFDS dataset) goes through
the ADM preprocessing (RGB, centre crop to ``image_size``); the image and its horizontal flip are
encoded together, sharded over all local devices, and written as one record
(``mdt_jax.data.records.encode_latent_record``: moments = mean ++ logvar, NHWC, float32).

Output folder::

    latents-00000-of-00042.array_record ...   the shards (renamed into place when complete)
    progress/run.json                         the run's settings; a restart must match them
    progress/shard-00000.json ...             per finished shard: counts, bytes, skipped images
    skipped.txt                               unreadable images (key, error), one per line
    manifest.json                             summary: class names, images per class, shards, bytes

A restarted run skips the shards already finished. Single-process only (one host).
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import itertools
import json
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mdt_jax import atomic, paths
from mdt_jax.data.image_sources import ImageSource, preprocess
from mdt_jax.data.records import ALIGN_DTYPE, encode_latent_record
from mdt_jax.models import dinov2
from mdt_jax.progress import Progress
from mdt_jax.vae.io import VAE, encode_fn

SHARD_PATTERN = 'latents-{i:05d}-of-{n:05d}.array_record'
# ArrayRecord writes local files only, and a restart resumes from shards renamed into place
LOCAL_OUT_REASON = (
    'shards are written and renamed into place on a local disk; extract '
    'locally, then copy the folder to the bucket (gcloud storage cp -r) and train '
    'with --config.data.path=gs://BUCKET/FOLDER'
)
PREFETCH = 4  # batches of images read ahead of the device


def _vae_fingerprint(vae: VAE) -> str:
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(vae.state):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()[:16]


def _check_run(progress_dir: str, settings: dict) -> None:
  """Record the run settings, or refuse a restart whose settings differ."""
  path = os.path.join(progress_dir, 'run.json')
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    diff = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    if diff:
      was, now = [before.get(k) for k in diff], [settings.get(k) for k in diff]
      raise ValueError(
          f'{path} was written by a run with other settings ({diff}: {was} vs now '
          f'{now}); use a new output folder or the same settings'
      )
  else:
    atomic.write_json(path, settings)


def _teacher_fingerprint(teacher) -> str:
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(nnx.state(teacher)):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()[:16]


def make_pair_encoder(vae: VAE, batch_size: int, teacher=None, resolution: int = dinov2.RESOLUTION):
  """Jitted fn(uint8 images [B, H, W, 3]) -> (moments, moments_flip), batch sharded over devices;
  with a DINOv2 ``teacher`` also (its patch tokens, those of the flip) as float16 [B, T, D], the
  images resized to ``resolution`` as REPA feeds its teacher (``mdt_jax.models.dinov2``).

  Each device encodes its images and their flips (interleaved, so nothing moves between devices).
  """
  devices = jax.local_devices()
  if batch_size % len(devices):
    raise ValueError(f'batch_size {batch_size} must be a multiple of the {len(devices)} devices')
  mesh = jax.make_mesh(
      (len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )
  batch, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())

  teacher_graph, state = None, {'vae': vae.state}
  if teacher is not None:
    teacher_graph, state['teacher'] = nnx.split(teacher)

  def pair(state, images):
    x = images.astype(jnp.float32) / 127.5 - 1
    b = x.shape[0]
    x = jnp.stack([x, x[:, :, ::-1]], axis=1).reshape(2 * b, *x.shape[1:])
    mean, logvar = encode_fn(vae.graphdef, state['vae'], x)
    m = jnp.concatenate([mean, logvar], axis=-1).reshape(b, 2, *mean.shape[1:3], -1)
    if teacher_graph is None:
      return m[:, 0], m[:, 1]
    model = nnx.merge(teacher_graph, state['teacher'])
    f = model.patch_tokens(dinov2.normalize(x, resolution)).astype(ALIGN_DTYPE)
    f = f.reshape(b, 2, *f.shape[1:])
    return m[:, 0], m[:, 1], f[:, 0], f[:, 1]

  outputs = 2 if teacher is None else 4
  fn = jax.jit(pair, in_shardings=(replicated, batch), out_shardings=(batch,) * outputs)
  state = jax.device_put(state, replicated)
  return lambda images: fn(state, jax.device_put(images, batch))


def _chunks(indices: Sequence[int], size: int):
  for s in range(0, len(indices), size):
    yield indices[s : s + size]


def _write_shard(
    source: ImageSource,
    indices: range,
    encode,
    pool,
    image_size: int,
    batch_size: int,
    tmp_path: str,
    progress: Progress,
) -> dict:
  """Encode `indices` into `tmp_path`; returns the shard's counts and skipped images."""

  def submit(chunk):
    return chunk, [pool.submit(_load_one, source, i, image_size) for i in chunk]

  writer = ArrayRecordWriter(tmp_path, 'group_size:1')
  counts, skipped, pending = collections.Counter(), [], None
  chunks = _chunks(indices, batch_size)
  queued = collections.deque(submit(c) for c in itertools.islice(chunks, PREFETCH))

  def flush(result):
    arrays, labels = result
    m, mf, *features = (np.asarray(a) for a in arrays)
    for k, label in enumerate(labels):
      pair = [f[k] for f in features]  # the teacher's features of the image and of its flip
      writer.write(encode_latent_record(m[k], mf[k], label, *pair))
      counts[source.class_names[label]] += 1

  try:
    while queued:
      chunk, futures = queued.popleft()
      nxt = next(chunks, None)
      if nxt is not None:
        queued.append(submit(nxt))
      images, labels = _gather(source, chunk, futures, skipped)
      result = None
      if images:
        batch = np.zeros((batch_size, image_size, image_size, 3), np.uint8)  # one static shape
        batch[: len(images)] = np.stack(images)
        result = (encode(batch), labels)  # dispatched asynchronously; written next iteration
      if pending is not None:
        flush(pending)
      pending = result
      progress.update(len(chunk))
    if pending is not None:
      flush(pending)
  finally:
    writer.close()
  return {
      'records': sum(counts.values()),
      'images_per_class': dict(sorted(counts.items())),
      'skipped': skipped,
  }


def _gather(source: ImageSource, chunk, futures, skipped: list) -> tuple[list, list]:
  """The loaded images and labels of one chunk; failures go to `skipped`."""
  images, labels = [], []
  for i, fut in zip(chunk, futures):
    out = fut.result()
    if isinstance(out, Exception):
      skipped.append([source.keys(i), f'{type(out).__name__}: {out}'])
      logging.warning('skipping unreadable image %s: %s', source.keys(i), out)
    else:
      images.append(out[0])
      labels.append(out[1])
  return images, labels


def _load_one(source: ImageSource, i: int, image_size: int):
  try:
    image, label = source.load(i)
    if not 0 <= label < len(source.class_names):
      raise ValueError(f'label {label} outside [0, {len(source.class_names)})')
    return preprocess(image, image_size), label
  except Exception as e:  # any decode error skips the image, never the run
    return e


def extract(
    source: ImageSource,
    vae: VAE,
    out_dir: str,
    *,
    image_size: int = 256,
    batch_size: int = 64,
    images_per_shard: int = 10_000,
    num_workers: int = 16,
    align_encoder: dinov2.Dinov2 | None = None,
    align_resolution: int = dinov2.RESOLUTION,
) -> dict:
  """Encode every image of `source` (and its flip) into ArrayRecord shards under `out_dir`;
  with ``align_encoder`` (a DINOv2, REPA's teacher) its patch tokens of the image and of the
  flip, at ``align_resolution`` px, are stored in each record too (float16).

  Returns the manifest (also written to ``out_dir/manifest.json``).
  """
  paths.require_local(out_dir, 'the latent output folder', LOCAL_OUT_REASON)
  if jax.process_count() > 1:
    raise ValueError(f'extraction runs on one host; got {jax.process_count()} processes')
  for name, v in (
      ('image_size', image_size),
      ('batch_size', batch_size),
      ('images_per_shard', images_per_shard),
      ('num_workers', num_workers),
  ):
    if int(v) < 1:
      raise ValueError(f'{name} must be a positive integer, got {v}')
  n = len(source)
  if n == 0:
    raise ValueError(f'the image source {source.description} is empty')
  num_shards = math.ceil(n / images_per_shard)
  progress_dir = os.path.join(out_dir, 'progress')
  os.makedirs(progress_dir, exist_ok=True)
  align = _teacher_settings(align_encoder, align_resolution)
  _check_run(
      progress_dir,
      {
          'source': source.description,
          'num_images': n,
          'num_shards': num_shards,
          'images_per_shard': images_per_shard,
          'image_size': image_size,
          'class_names': source.class_names,
          'vae_config': vae.config.to_dict(),
          'vae_dtype': jnp.dtype(vae.dtype).name,
          'vae_fingerprint': _vae_fingerprint(vae),
          'align_encoder': align,
      },
  )

  encode = make_pair_encoder(vae, batch_size, align_encoder, align_resolution)
  progress = Progress(n, 'latents', unit='images')
  with progress, concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    for s in range(num_shards):
      indices = range(s * images_per_shard, min(n, (s + 1) * images_per_shard))
      final = os.path.join(out_dir, SHARD_PATTERN.format(i=s, n=num_shards))
      info_path = os.path.join(progress_dir, f'shard-{s:05d}.json')
      if os.path.exists(final) and os.path.exists(info_path):
        logging.info('shard %d/%d already finished, skipped', s + 1, num_shards)
        progress.skip(len(indices))
        continue
      tmp = os.path.join(out_dir, '.' + os.path.basename(final) + '.tmp')
      info = _write_shard(source, indices, encode, pool, image_size, batch_size, tmp, progress)
      info.update(file=os.path.basename(final), bytes=os.path.getsize(tmp))
      atomic.write_json(info_path, info)  # before the rename: a finished shard always has its info
      os.replace(tmp, final)
  return _finish(out_dir, progress_dir, source, vae, num_shards, image_size, align)


def _teacher_settings(teacher, resolution: int) -> dict | None:
  """What the stored features are: the teacher's architecture and weights, the input size, the
  features' shape (None without a teacher)."""
  if teacher is None:
    return None
  c = teacher.config
  grid = resolution // c.patch_size
  return {
      'config': c.to_dict(),
      'fingerprint': _teacher_fingerprint(teacher),
      'resolution': int(resolution),
      'features_shape': [grid * grid, c.hidden_size],
      'dtype': np.dtype(ALIGN_DTYPE).name,
  }


def _finish(out_dir, progress_dir, source, vae, num_shards, image_size, align) -> dict:
  shards, per_class, skipped = [], collections.Counter(), []
  for s in range(num_shards):
    with open(os.path.join(progress_dir, f'shard-{s:05d}.json')) as f:
      info = json.load(f)
    shards.append({k: info[k] for k in ('file', 'records', 'bytes')})
    per_class.update(info['images_per_class'])
    skipped.extend(info['skipped'])
  with open(os.path.join(out_dir, 'skipped.txt'), 'w') as f:
    f.writelines(f'{key}\t{err}\n' for key, err in skipped)
  f = vae.config.downsample_factor
  manifest = {
      'format': 'mdt_jax latent records (mdt_jax.data.records), moments = mean ++ logvar, NHWC',
      'source': source.description,
      'image_size': image_size,
      'moments_shape': [image_size // f, image_size // f, 2 * vae.config.latent_channels],
      'scaling_factor': vae.config.scaling_factor,
      'num_images': sum(sh['records'] for sh in shards),
      'num_skipped': len(skipped),
      'num_shards': num_shards,
      'bytes': sum(sh['bytes'] for sh in shards),
      'class_names': source.class_names,
      'images_per_class': {c: per_class.get(c, 0) for c in source.class_names},
      'shards': shards,
      # the REPA teacher's features stored beside the latents (records 'align', 'align_flip')
      'align_features': align,
  }
  atomic.write_json(os.path.join(out_dir, 'manifest.json'), manifest)
  counts = list(manifest['images_per_class'].values())
  logging.info(
      'done: %d images in %d shards, %.2f MB, %d classes (per class min %d, max %d), '
      '%d skipped (listed in %s)',
      manifest['num_images'],
      num_shards,
      manifest['bytes'] / 1e6,
      len(counts),
      min(counts),
      max(counts),
      len(skipped),
      os.path.join(out_dir, 'skipped.txt'),
  )
  return manifest
