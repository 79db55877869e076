"""A VAE folder (``config.json`` + ``model.safetensors``) and the jitted encode/decode over it.

Parameter names in ``model.safetensors`` are the NNX module paths joined with '.', e.g.
``encoder.down_blocks.0.resnets.1.conv2.kernel`` (conv kernels [kh, kw, in, out], linear
kernels [in, out], GroupNorm ``scale``/``bias``), all float32.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from mdt_jax import paths
from mdt_jax.atomic import atomic_folder, require_complete
from mdt_jax.models.params import InitKeys, param_name
from mdt_jax.vae.model import AutoencoderKL, VAEConfig

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'


def param_shapes(config: VAEConfig, dtype=jnp.float32) -> tuple[nnx.GraphDef, dict]:
  """GraphDef and {name: (shape, Variable)} of an abstract (unallocated) model."""
  abstract = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=InitKeys(0), dtype=dtype))
  graphdef, state = nnx.split(abstract)
  return graphdef, {param_name(p): v for p, v in nnx.to_flat_state(state)}


def check_params(config: VAEConfig, params: dict[str, np.ndarray], what: str) -> None:
  """Raise ValueError naming every missing, unexpected and mis-shaped parameter."""
  _, expected = param_shapes(config)
  missing = sorted(set(expected) - set(params))
  unexpected = sorted(set(params) - set(expected))
  mismatched = sorted(
      f'{k}: {tuple(params[k].shape)} != expected {tuple(expected[k].shape)}'
      for k in set(expected) & set(params)
      if tuple(params[k].shape) != tuple(expected[k].shape)
  )
  if missing or unexpected or mismatched:
    raise ValueError(
        f'{what} does not match the AutoencoderKL config: missing keys {missing}, '
        f'unexpected keys {unexpected}, mismatched shapes {mismatched}'
    )


def from_params(
    config: VAEConfig, params: dict[str, np.ndarray], dtype=jnp.float32
) -> AutoencoderKL:
  """An AutoencoderKL holding `params` (our names); every name and shape must match."""
  check_params(config, params, 'parameter set')
  graphdef, expected = param_shapes(config, dtype)
  state = nnx.from_flat_state(
      [
          (
              tuple(int(p) if p.isdigit() else p for p in k.split('.')),
              v.replace(jnp.asarray(params[k], jnp.float32)),
          )
          for k, v in expected.items()
      ]
  )
  return nnx.merge(graphdef, state)


def random_params(config: VAEConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights (norms and biases too) drawn in numpy, for tests and benchmarks.

  Built without running JAX initialisers, which would compile many small programs.
  """
  rng = np.random.default_rng(seed)
  params = {}
  for name, v in param_shapes(config)[1].items():
    shape = tuple(v.shape)
    if name.endswith('kernel'):
      fan_in = int(np.prod(shape[:-1]))
      params[name] = rng.normal(size=shape) / np.sqrt(fan_in)
    elif name.endswith('scale'):
      params[name] = 1 + 0.2 * rng.normal(size=shape)
    else:
      params[name] = 0.2 * rng.normal(size=shape)
  return {k: v.astype(np.float32) for k, v in params.items()}


def to_params(model: AutoencoderKL) -> dict[str, np.ndarray]:
  """{name: float32 numpy array} of every parameter."""
  return {
      param_name(p): np.asarray(v[...], np.float32)
      for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def write_folder(
    out_dir: str, config: VAEConfig, params: dict[str, np.ndarray], overwrite: bool = False
) -> str:
  """Write a VAE folder atomically: a temp folder beside `out_dir`, renamed when complete."""
  check_params(config, params, 'parameter set')
  with atomic_folder(out_dir, overwrite) as tmp:
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      json.dump({'_class_name': 'AutoencoderKL', **config.to_dict()}, f, indent=2)
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()},
        os.path.join(tmp, WEIGHTS_FILE),
        metadata={'format': 'mdt_jax.vae'},
    )
  return paths.resolve(out_dir)


def save(model: AutoencoderKL, out_dir: str, overwrite: bool = False) -> str:
  """Write `model` as a VAE folder that ``load`` reads."""
  return write_folder(out_dir, model.config, to_params(model), overwrite)


def read_vae_config(vae_dir: str, name: str = CONFIG_FILE) -> dict:
  """A VAE folder's config.json (ours or diffusers': the same AutoencoderKL fields)."""
  path = paths.path(vae_dir) / name
  if not path.is_file():
    raise FileNotFoundError(f'no {name} in VAE folder {vae_dir!r}')
  return json.loads(path.read_text())


def load_model(vae_dir: str, dtype=jnp.float32) -> AutoencoderKL:
  """The AutoencoderKL NNX module stored in `vae_dir` (as written by ``save``/convert_vae)."""
  config = VAEConfig.from_dict(read_vae_config(vae_dir))
  path = paths.path(vae_dir) / WEIGHTS_FILE
  if not path.is_file():
    raise FileNotFoundError(
        f'no {WEIGHTS_FILE} in VAE folder {vae_dir!r} '
        '(a diffusers folder must first go through tools/convert_vae.py)'
    )
  require_complete(vae_dir, 'VAE folder')
  return from_params(config, paths.load_safetensors(path), dtype)


def encode_fn(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array):
  """Pure form of ``AutoencoderKL.encode`` for jax.jit / sharded use: (mean, logvar)."""
  return nnx.merge(graphdef, state).encode(images)


def decode_fn(graphdef: nnx.GraphDef, state: nnx.State, latents: jax.Array) -> jax.Array:
  """Pure form of ``AutoencoderKL.decode`` (unscaled latents -> images in [-1, 1])."""
  return nnx.merge(graphdef, state).decode(latents)


class VAE:
  """A loaded VAE with jitted ``encode`` and ``decode`` (one compilation per input shape).

  ``graphdef`` / ``state`` with ``encode_fn`` / ``decode_fn`` give the functional form, e.g. to
  jit with explicit shardings.
  """

  def __init__(self, model: AutoencoderKL):
    self.config: VAEConfig = model.config
    self.dtype = model.dtype
    self.graphdef, self.state = nnx.split(model)
    self._encode = jax.jit(functools.partial(encode_fn, self.graphdef))
    self._decode = jax.jit(functools.partial(decode_fn, self.graphdef))

  @property
  def scaling_factor(self) -> float:
    return self.config.scaling_factor

  @property
  def model(self) -> AutoencoderKL:
    return nnx.merge(self.graphdef, self.state)

  def encode(self, images) -> tuple[jax.Array, jax.Array]:
    """(mean, logvar), float32 NHWC, of images NHWC in [-1, 1]; logvar clipped to [-30, 20]."""
    return self._encode(self.state, jnp.asarray(images))

  def decode(self, latents) -> jax.Array:
    """Images NHWC (float32, about [-1, 1]) from *unscaled* latents (divide by 0.18215 first)."""
    return self._decode(self.state, jnp.asarray(latents))


def load(vae_dir: str, dtype=jnp.float32) -> VAE:
  """``VAE`` from a folder written by tools/convert_vae.py; `dtype` is the compute dtype."""
  return VAE(load_model(vae_dir, dtype))
