"""Batched Inception features, sharded over all devices, and streaming reads of ADM .npz files.

``FeatureExtractor`` jits the Inception forward pass with the batch sharded over a 1-D mesh
(axis ``data``) of all devices and the weights replicated; the last batch is zero-padded to the
full size so one compilation serves the whole run. ``NpzImages`` reads ``arr_0`` of an .npz batch
by batch from the zip member (a 50,000 x 256 x 256 x 3 batch is 9.8 GB; it is never loaded whole).
"""

from __future__ import annotations

import functools
import zipfile
from typing import Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mdt_jax.evaluation.inception import InceptionV3
from mdt_jax.progress import Progress


def check_images(images: np.ndarray, what: str = 'images') -> None:
  """Raises unless images are uint8 [N, H, W, 3] (the ADM sample layout)."""
  if images.dtype != np.uint8:
    raise ValueError(
        f'{what} must be uint8 in [0, 255] (ADM layout), got dtype {images.dtype}; '
        'convert [-1, 1] floats with np.clip(np.round((x + 1) * 127.5), 0, 255)'
        '.astype(np.uint8)'
    )
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'{what} must have shape [N, H, W, 3] (RGB, NHWC), got {images.shape}')
  if min(images.shape[1:3]) < 8:
    raise ValueError(
        f'{what} are {images.shape[1]}x{images.shape[2]}; expected images of at '
        'least 8x8 pixels (the ADM protocol uses 256x256)'
    )


class NpzImages:
  """The array ``key`` of an .npz file, read lazily in batches (shape and dtype from the header)."""

  def __init__(self, path: str, key: str = 'arr_0'):
    self.path, self.key = path, key
    with zipfile.ZipFile(path) as z, z.open(f'{key}.npy') as f:
      self.shape, self.dtype, self._fortran = _read_header(f)

  def __len__(self) -> int:
    return self.shape[0]

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive batches of at most batch_size rows."""
    row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
    if self._fortran:  # rare; no streaming for column-major data
      with np.load(self.path) as npz:
        arr = npz[self.key]
      for start in range(0, len(arr), batch_size):
        yield arr[start : start + batch_size]
      return
    with zipfile.ZipFile(self.path) as z, z.open(f'{self.key}.npy') as f:
      _read_header(f)
      for start in range(0, self.shape[0], batch_size):
        n = min(batch_size, self.shape[0] - start)
        data = _read_exact(f, n * row)
        yield np.frombuffer(data, self.dtype).reshape((n,) + tuple(self.shape[1:]))


def _read_header(f) -> tuple[tuple, np.dtype, bool]:
  version = np.lib.format.read_magic(f)
  read = {
      (1, 0): np.lib.format.read_array_header_1_0,
      (2, 0): np.lib.format.read_array_header_2_0,
  }.get(version)
  if read is None:
    raise ValueError(f'unsupported .npy format version {version}')
  shape, fortran, dtype = read(f)
  if dtype.hasobject:
    raise ValueError('arrays of Python objects are not supported')
  return tuple(shape), dtype, fortran


def _read_exact(f, size: int) -> bytes:
  parts, got = [], 0
  while got < size:
    chunk = f.read(size - got)
    if not chunk:
      raise ValueError(f'truncated .npy data: expected {size} bytes, got {got}')
    parts.append(chunk)
    got += len(chunk)
  return b''.join(parts)


def data_mesh(devices=None) -> jax.sharding.Mesh:
  """1-D mesh ('data',) over the given (default: all) devices."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.sharding.Mesh(np.asarray(devices), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


@functools.lru_cache(maxsize=8)
def _sharded_forward(graphdef, mesh):
  """Jitted forward pass: weights replicated, batch split over 'data' (cached: compiles once)."""
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))

  def forward(state, images):
    return nnx.merge(graphdef, state)(images)

  return jax.jit(forward, in_shardings=(replicated, split), out_shardings=split)


class FeatureExtractor:
  """Inception features of uint8 image batches, data-parallel over a device mesh.

  Single-process: the host feeds whole global batches (multi-host runs would need each process
  to feed its part with ``jax.make_array_from_process_local_data``).
  """

  def __init__(self, model: InceptionV3, batch_size: int = 256, mesh=None):
    self.mesh = mesh if mesh is not None else data_mesh()
    n = self.mesh.devices.size
    self.batch_size = max(n, -(-batch_size // n) * n)  # a multiple of the device count
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, NamedSharding(self.mesh, P()))
    self._in = NamedSharding(self.mesh, P('data'))
    self._forward = _sharded_forward(graphdef, self.mesh)

  def _run(self, batch: np.ndarray):
    n = len(batch)
    if n < self.batch_size:
      pad = np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)
      batch = np.concatenate([batch, pad])
    return self._forward(self._state, jax.device_put(batch, self._in)), n

  def __call__(
      self, batches, total: int | None = None, label: str = 'images', progress: bool = True
  ) -> dict[str, np.ndarray]:
    """Features {'pool', 'spatial'[, 'logits']} of an array or an iterable of uint8 batches."""
    if isinstance(batches, np.ndarray):
      array = batches
      check_images(array, label)
      total = len(array)
      batches = (array[i : i + self.batch_size] for i in range(0, total, self.batch_size))
    out: dict[str, list] = {}
    pending = None
    bar = Progress(total, f'[inception] {label}') if progress and total else None

    def collect(item):
      feats, n = item
      for k, v in feats.items():
        out.setdefault(k, []).append(np.asarray(v)[:n])  # slice on the host, not on device
      if bar is not None:
        bar.update(n)

    for batch in _rechunk(batches, self.batch_size, label):
      item = self._run(batch)  # dispatched asynchronously
      if pending is not None:  # gather the previous batch while this one runs
        collect(pending)
      pending = item
    if pending is not None:
      collect(pending)
    if bar is not None:
      bar.close()
    if not out:
      raise ValueError(f'no {label} to compute features of')
    return {k: np.concatenate(v) for k, v in out.items()}


def _rechunk(batches, size: int, label: str) -> Iterator[np.ndarray]:
  """Checked batches of at most ``size`` images (larger input batches are split)."""
  for batch in batches:
    check_images(batch, label)
    for i in range(0, len(batch), size):
      yield batch[i : i + size]
