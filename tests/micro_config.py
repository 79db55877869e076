"""A tiny MDTv2 on 8x8 digits for the training tests (compiles in seconds), and tiny random
models (and model folders of them) for the sampling tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdt_jax.hub.folder import save_model_folder
from mdt_jax.models.mdt import MDT, MDTConfig
from mdt_jax.models.params import abstract_model
from mdt_jax.configs_base import base_config, model_config


def get_config():
  c = base_config()
  c.model = model_config(
      'S/2',
      input_size=8,
      in_channels=1,
      hidden_size=32,
      depth=3,
      num_heads=2,
      decode_layer=1,
      num_classes=10,
  )
  c.data.update(name='digits', image_size=8, flip=False, num_threads=1, prefetch=2, vae=None)
  c.global_batch_size = 16
  c.total_steps = 6
  c.optimizer.learning_rate = 1e-3
  c.ema_decay = 0.9
  c.checkpoint_every_steps = 3
  c.log_every_steps = 3
  # async_checkpointing stays the default (True), as in users' runs: every resume, kill and
  # preemption test runs it (test_training keeps one test of the synchronous mode)
  return c


def random_mdt(seed: int = 0, label_std: float = 1.0, **fields) -> MDT:
  """A tiny MDTv2 (8x8, 2 blocks of width 32, 10 classes, no masking unless `fields` say so)
  with every parameter random: the zero init would output zeros.

  Built abstractly and filled from numpy: eager initialisation costs seconds of op dispatch.
  The label table is N(0, label_std), so that the class visibly matters; the rest N(0, 0.1).
  """
  tiny = dict(
      input_size=8,
      hidden_size=32,
      depth=2,
      decode_layer=0,
      num_heads=2,
      num_classes=10,
      mask_ratio=None,
  )
  config = MDTConfig.from_dict(model_config('S/2', **{**tiny, **fields}).to_dict())
  graphdef, params, rest = nnx.split(abstract_model(config), nnx.Param, ...)
  rng = np.random.default_rng(seed)
  labels = config.num_classes + 1
  draw = lambda v: jnp.asarray(
      rng.normal(size=v.shape) * (label_std if v.shape[0] == labels else 0.1), jnp.float32
  )
  return nnx.merge(graphdef, jax.tree.map(draw, params), rest)


def save_pixel_folder(path, model: MDT, **sampling) -> str:
  """A model folder of a pixel-space model with the given recommended sampler settings."""
  return save_model_folder(
      str(path),
      nnx.state(model, nnx.Param),
      model.config,
      data=dict(
          space='pixel',
          image_size=model.config.input_size,
          image_channels=model.config.in_channels,
          vae=None,
      ),
      sampling=sampling,
  )
