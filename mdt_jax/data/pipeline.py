"""grain input pipelines: latent ArrayRecords (ImageNet) and the bundled digits (quickstart).

Both give batches {'x': float32 [b, H, W, C] NHWC, 'y': int32 [b]} through the same code:
source -> seed -> shuffle (reshuffled every epoch) -> repeat -> decode -> random augment ->
batch of the per-process size -> this process's batches -> prefetching iterator.

The global stream is cut into per-process batches in order, and process p takes every P-th of
them, so the global batch of a step is the same whatever the number of processes, and every
random transform is seeded by the element's index (grain), not by the process.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import grain
import jax
import numpy as np

from mdt_jax import errors, paths
from mdt_jax.data.digits import load_digits_images, select_split
from mdt_jax.data.records import decode_latent_record
from mdt_jax.data.spec import SOURCES, DataSpec
from mdt_jax.vae.model import LATENT_SCALE


class ArraySource:
  """Random-access source over in-memory arrays (the digits)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict:
    return {'x': self.images[i], 'y': self.labels[i]}


def latent_files(path: str) -> list[str]:
  """The shards of a folder (or a glob pattern), local or on object storage (gs://, which
  ArrayRecord reads itself)."""
  p = paths.path(path)
  if paths.is_remote(path):
    found = p.glob('*.array_record') if p.is_dir() else p.parent.glob(p.name)
    files = sorted(os.fspath(f) for f in found)
  else:
    files = (
        sorted(glob.glob(os.path.join(path, '*.array_record')))
        if os.path.isdir(path)
        else sorted(glob.glob(path))
    )
  if not files:
    raise FileNotFoundError(
        f'no *.array_record latent shards found at {path!r} '
        '(write them with tools/extract_latents.py)'
    )
  return files


def sample_latent(
    record: bytes, rng: np.random.Generator, flip: bool = True, align: bool = False
) -> dict:
  """Pick the image or its flip (p = 0.5), sample the posterior, scale by 0.18215. ``align``:
  also the stored teacher features of the same pick ('align', float32 [T, D]: the flipped
  image's for the flipped latent)."""
  rec = decode_latent_record(record)
  flipped = flip and rng.random() < 0.5
  moments = rec['moments_flip'] if flipped else rec['moments']
  moments = np.asarray(moments, np.float32)
  mean, logvar = np.split(moments, 2, axis=-1)
  std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
  z = mean + std * rng.standard_normal(mean.shape).astype(np.float32)
  out = {'x': (z * LATENT_SCALE).astype(np.float32), 'y': np.int32(rec['label'])}
  if align:
    if 'align' not in rec:
      raise ValueError(
          'a latent record without teacher features: the shards were extracted without '
          'tools/extract_latents.py --align_encoder'
      )
    out['align'] = np.asarray(rec['align_flip'] if flipped else rec['align'], np.float32)
  return out


def make_source(cfg: DataSpec):
  if cfg.name == 'digits':
    images, labels = select_split(*load_digits_images(cfg.image_size), cfg.split)
    return ArraySource(images, labels)
  if cfg.name == 'latents':
    files = latent_files(cfg.path)
    try:
      return grain.sources.ArrayRecordDataSource(files)
    except RuntimeError:  # names no file (a truncated shard gives an empty message)
      for f in files:
        _open_shard(f)
      raise
  raise ValueError(f'data.name must be one of {SOURCES}, got {cfg.name!r}')


def _open_shard(path: str) -> grain.sources.ArrayRecordDataSource:
  try:
    return grain.sources.ArrayRecordDataSource([path])
  except RuntimeError as e:
    raise errors.BadFile(
        f'latent shard {path} cannot be read (truncated, overwritten or not an '
        f'ArrayRecord file?): {str(e) or "no readable index at its end"}; expected an '
        'ArrayRecord file of latent records as tools/extract_latents.py writes'
    ) from e


def latent_shape(path: str) -> tuple[int, int]:
  """(latent size, channels), after opening every shard and decoding its first record: a
  damaged or foreign shard, or shards of two latent sizes, fail here with the file named
  instead of in a reader thread mid-run. Costs one record per shard."""
  spec, first = None, None
  for f in latent_files(path):
    src = _open_shard(f)
    if len(src) == 0:
      continue
    try:
      h, _, c2 = decode_latent_record(src[0])['moments'].shape
    except ValueError as e:
      raise ValueError(
          f'latent shard {f} does not hold latent records (as '
          f'tools/extract_latents.py writes them): {e}'
      ) from e
    if spec is None:
      spec, first = (h, c2 // 2), f
    elif (h, c2 // 2) != spec:
      raise ValueError(
          f'latent shard {f} holds {h}x{h}x{c2 // 2} latents but {first} holds '
          f'{spec[0]}x{spec[0]}x{spec[1]}: one data.path must hold one latent size'
      )
  if spec is None:
    raise ValueError(f'every latent shard under {path!r} is empty')
  return spec


def align_features(path: str) -> tuple[int, int] | None:
  """(tokens, dim) of the teacher features stored in a latent folder's records (its first
  record), or None: latents only."""
  for f in latent_files(path):
    src = _open_shard(f)
    if len(src):
      rec = decode_latent_record(src[0])
      return tuple(rec['align'].shape) if 'align' in rec else None
  return None


def manifest_classes(path: str) -> int | None:
  """The number of classes in a latent folder's manifest.json (None without one)."""
  manifest = paths.path(path) / 'manifest.json'
  if not manifest.is_file():
    return None
  return len(json.loads(manifest.read_text())['class_names'])


def check_batch(batch: dict, num_classes: int, source: str) -> dict:
  """Refuse class ids outside [0, num_classes) and non-finite inputs before they reach the
  devices: the label table would give NaN rows (or a wrong class) and the loss turn NaN."""
  y = np.asarray(batch['y'])
  bad = (y < 0) | (y >= num_classes)
  if bad.any():
    raise ValueError(
        f'class id {int(y[bad][0])} in an input batch from {source} is outside '
        f'[0, {num_classes}) (model.num_classes={num_classes}); the data has more '
        'classes than the model'
    )
  x = np.asarray(batch['x'])
  finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
  if not finite.all():
    raise ValueError(
        f'an input batch from {source} holds NaN or inf in {int((~finite).sum())} '
        f'example(s) (class ids {y[~finite][:8].tolist()}): the data is damaged; '
        'training stopped before using it'
    )
  return batch


def element_spec(cfg: DataSpec) -> tuple[int, int]:
  """(spatial size, channels) of the training tensors x."""
  if cfg.name == 'digits':
    return cfg.image_size, 1
  if cfg.name == 'latents' and cfg.path:
    return latent_shape(cfg.path)
  return cfg.image_size // 8, 4  # SD-VAE: 8x downsampling, 4 channels


def make_dataset(
    cfg: DataSpec,
    *,
    seed: int,
    local_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    align: bool = False,
) -> grain.IterDataset:
  """``align``: batches also hold the stored teacher features ('align', latents only)."""
  source = make_source(cfg)
  if len(source) == 0:
    raise ValueError(f'dataset {cfg.name!r} is empty')
  if len(source) < local_batch * process_count:
    raise ValueError(
        f'dataset {cfg.name!r} has {len(source)} examples, fewer than one global '
        f'batch ({local_batch * process_count})'
    )
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  if cfg.name == 'latents':
    ds = ds.random_map(lambda r, rng: sample_latent(r, rng, cfg.flip, align))
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds[process_index::process_count]
  opts = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
  return ds.to_iter_dataset(opts)


def make_iterator(cfg: DataSpec, *, seed: int, global_batch: int, align: bool = False) -> Iterator:
  """This process's iterator (it has get_state/set_state for checkpoints); ``align``:
  `make_dataset`'s."""
  pc = jax.process_count()
  if global_batch % pc:
    raise ValueError(f'global_batch_size {global_batch} is not divisible by the process count {pc}')
  ds = make_dataset(
      cfg,
      seed=seed,
      local_batch=global_batch // pc,
      process_index=jax.process_index(),
      process_count=pc,
      align=align,
  )
  return iter(ds)


def to_global(batch: dict, sharding: jax.sharding.NamedSharding) -> dict:
  """This process's numpy batch -> global jax arrays sharded over the data axes."""
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }
