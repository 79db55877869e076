"""Encode an image dataset with the SD VAE into ArrayRecord shards of latent records.

Each image goes through the ADM preprocessing (RGB, centre crop to ``image_size``); the image and
its horizontal flip are encoded together, sharded over all local devices, and written as one
record (``mdt_jax.data.records.encode_latent_record``: moments = mean ++ logvar, NHWC, float32).

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
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from mdt_jax import atomic, paths
from mdt_jax.data.records import encode_latent_record
from mdt_jax.progress import Progress
from mdt_jax.vae.io import VAE, encode_fn

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'gif')  # the ADM loader's list
SHARD_PATTERN = 'latents-{i:05d}-of-{n:05d}.array_record'
# ArrayRecord writes local files only, and a restart resumes from shards renamed into place
LOCAL_OUT_REASON = (
    'shards are written and renamed into place on a local disk; extract '
    'locally, then copy the folder to the bucket (gcloud storage cp -r) and train '
    'with --config.data.path=gs://BUCKET/FOLDER'
)
PREFETCH = 4  # batches of images read ahead of the device


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
  """ADM centre crop: halve with BOX while the short side >= 2*size, BICUBIC to short side
  `size`, crop the centre. Returns uint8 [size, size, C]."""
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
  arr = np.asarray(image)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top : top + size, left : left + size]


def preprocess(image: Image.Image, size: int) -> np.ndarray:
  """RGB, ADM centre crop; uint8 [size, size, 3] (scaled to [-1, 1] on the device)."""
  image.load()
  return center_crop_arr(image.convert('RGB'), size)


@dataclasses.dataclass
class ImageSource:
  """Random-access images: ``load(i)`` -> (PIL image, label), which may raise on a bad image."""

  keys: Callable[[int], str]
  load: Callable[[int], tuple[Image.Image, int]]
  size: int
  class_names: list[str]
  description: dict[str, Any]

  def __len__(self) -> int:
    return self.size


def folder_source(root: str, label_from: str = 'folder') -> ImageSource:
  """Images under `root` (extensions as ADM: jpg, jpeg, png, gif), listed recursively, sorted.

  The class is the sub-folder directly under `root` (``label_from='folder'``) or the file-name
  prefix before the first '_' (``'prefix'``, as the ADM loader does); label = index in the sorted
  list of class names.
  """
  if label_from not in ('folder', 'prefix'):
    raise ValueError(f"label_from must be 'folder' or 'prefix', got {label_from!r}")
  if not os.path.isdir(root):
    raise FileNotFoundError(f'image folder {root!r} does not exist or is not a folder')
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in filenames:
      if '.' in name and name.rsplit('.', 1)[1].lower() in IMAGE_EXTENSIONS:
        files.append(os.path.relpath(os.path.join(dirpath, name), root))
  files.sort()
  if not files:
    raise ValueError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {root!r}')
  if label_from == 'folder':
    loose = [f for f in files if os.sep not in f]
    if loose:
      raise ValueError(
          f'{len(loose)} images lie directly in {root!r} (e.g. {loose[:3]}), not in '
          "a class sub-folder; move them or use label_from='prefix'"
      )
    classes = [f.split(os.sep, 1)[0] for f in files]
  else:
    classes = [os.path.basename(f).split('_', 1)[0] for f in files]
  class_names = sorted(set(classes))
  index = {c: i for i, c in enumerate(class_names)}
  labels = [index[c] for c in classes]

  def load(i):
    with open(os.path.join(root, files[i]), 'rb') as f:
      return Image.open(io.BytesIO(f.read())), labels[i]

  return ImageSource(
      keys=files.__getitem__,
      load=load,
      size=len(files),
      class_names=class_names,
      description={'source': 'folder', 'root': os.path.abspath(root), 'label_from': label_from},
  )


def tfds_source(
    name: str = 'imagenet2012', split: str = 'train', data_dir: str | None = None
) -> ImageSource:
  """A prepared TFDS dataset (array_record file format) through ``tfds.data_source``.

  Images are read as the stored bytes and decoded with PIL, as the ADM loader decodes files.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError('the TFDS source needs tensorflow-datasets (see requirements.txt)') from e
  try:
    ds = tfds.data_source(
        name,
        split=split,
        data_dir=data_dir,
        download=False,
        decoders={'image': tfds.decode.SkipDecoding()},
    )
  except Exception as e:  # tfds raises several types for a missing / unprepared dataset
    raise FileNotFoundError(
        f'cannot open TFDS dataset {name!r} split {split!r} in data_dir {data_dir!r} '
        f'(it must be prepared in array_record format): {e}'
    ) from e
  if len(ds) == 0:
    raise ValueError(f'TFDS dataset {name!r} split {split!r} in {data_dir!r} is empty')
  class_names = list(ds.dataset_info.features['label'].names)

  def key(i):
    return f'{name}/{split}[{i}]'

  def load(i):
    ex = ds[i]
    img = ex['image']
    if isinstance(img, (bytes, np.bytes_)):
      img = Image.open(io.BytesIO(img))
    else:
      img = Image.fromarray(np.asarray(img))
    return img, int(ex['label'])

  return ImageSource(
      keys=key,
      load=load,
      size=len(ds),
      class_names=class_names,
      description={
          'source': 'tfds',
          'name': name,
          'split': split,
          'data_dir': os.path.abspath(data_dir) if data_dir else None,
      },
  )


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


def make_pair_encoder(vae: VAE, batch_size: int):
  """Jitted fn(uint8 images [B, H, W, 3]) -> (moments, moments_flip), batch sharded over devices.

  Each device encodes its images and their flips (interleaved, so nothing moves between devices).
  """
  devices = jax.local_devices()
  if batch_size % len(devices):
    raise ValueError(f'batch_size {batch_size} must be a multiple of the {len(devices)} devices')
  mesh = jax.make_mesh(
      (len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )
  batch, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())

  def pair(state, images):
    x = images.astype(jnp.float32) / 127.5 - 1
    b = x.shape[0]
    x = jnp.stack([x, x[:, :, ::-1]], axis=1).reshape(2 * b, *x.shape[1:])
    mean, logvar = encode_fn(vae.graphdef, state, x)
    m = jnp.concatenate([mean, logvar], axis=-1).reshape(b, 2, *mean.shape[1:3], -1)
    return m[:, 0], m[:, 1]

  fn = jax.jit(pair, in_shardings=(replicated, batch), out_shardings=(batch, batch))
  state = jax.device_put(vae.state, replicated)
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
    (m, mf), labels = result
    m, mf = np.asarray(m), np.asarray(mf)
    for k, label in enumerate(labels):
      writer.write(encode_latent_record(m[k], mf[k], label))
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
) -> dict:
  """Encode every image of `source` (and its flip) into ArrayRecord shards under `out_dir`.

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
      },
  )

  encode = make_pair_encoder(vae, batch_size)
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
  return _finish(out_dir, progress_dir, source, vae, num_shards, image_size)


def _finish(out_dir, progress_dir, source, vae, num_shards, image_size) -> dict:
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
