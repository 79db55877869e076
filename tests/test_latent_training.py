"""The latent dataset end to end: extract an image folder with a VAE, then train on the shards."""

import json
import os
import sys

import jax
import numpy as np
import pytest

import launch
import mdt_jax.vae as vae_lib
from micro_config import get_config
from mdt_jax.data import pipeline
from mdt_jax.data.records import decode_latent_record, encode_latent_record
from mdt_jax.vae.model import LATENT_SCALE
from mdt_jax.training.loop import train_and_evaluate
from test_extract import TINY, make_folder


def test_sample_latent_draws_the_posterior_and_scales():
  rng = np.random.default_rng(0)
  mean = rng.standard_normal((4, 4, 4)).astype(np.float32)
  logvar = np.full((4, 4, 4), -2.0, np.float32)
  rec = encode_latent_record(
      np.concatenate([mean, logvar], -1), np.concatenate([mean[:, ::-1], logvar], -1), 3
  )
  draws = np.stack(
      [pipeline.sample_latent(rec, np.random.default_rng(i), flip=False)['x'] for i in range(4000)]
  )
  np.testing.assert_allclose(draws.mean(0), mean * LATENT_SCALE, atol=0.004)
  np.testing.assert_allclose(draws.std(0), np.exp(-1.0) * LATENT_SCALE, rtol=0.08)
  flips = [pipeline.sample_latent(rec, np.random.default_rng(i))['x'] for i in range(200)]
  near_flip = np.mean(
      [
          np.abs(x - mean[:, ::-1] * LATENT_SCALE).mean() < np.abs(x - mean * LATENT_SCALE).mean()
          for x in flips
      ]
  )
  assert 0.35 < near_flip < 0.65  # the flipped copy is used half the time
  assert pipeline.sample_latent(rec, rng)['y'] == 3
  with pytest.raises(ValueError, match='corrupt latent record'):
    decode_latent_record(b'\x00garbage')


def test_extract_with_the_tool_then_train_and_resume_exactly(tmp_path):
  """tools/extract_latents.py as users run it on an image folder, then training on its shards:
  a run stopped at step 2 and resumed to 4 equals the uninterrupted 4 steps (the shard reader's
  position and the per-record posterior draws are restored)."""
  config = vae_lib.VAEConfig.from_dict(TINY)
  vae_dir, latents = str(tmp_path / 'vae'), str(tmp_path / 'latents')
  vae_lib.io.write_folder(vae_dir, config, vae_lib.random_params(config, seed=0))
  make_folder(tmp_path / 'images')
  proc = launch.run(
      [
          sys.executable,
          os.path.join(launch.ROOT, 'tools', 'extract_latents.py'),
          f'--vae={vae_dir}',
          '--source=folder',
          f'--image_dir={tmp_path / "images"}',
          f'--out={latents}',
          '--image_size=16',
          '--batch_size=8',
          '--images_per_shard=8',
          '--num_workers=2',
      ]
  )
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert json.load(open(os.path.join(latents, 'manifest.json')))['num_images'] == 21
  c = get_config()
  c.data = dict(
      name='latents',
      path=latents,
      image_size=16,
      flip=True,
      num_threads=1,
      prefetch=2,
      vae=vae_dir,
  )
  c.model.input_size, c.model.in_channels, c.model.num_classes = 8, 4, 2
  assert pipeline.element_spec(c.data) == (8, 4)
  c.global_batch_size, c.total_steps, c.checkpoint_every_steps = 8, 4, 2
  full = train_and_evaluate(c, str(tmp_path / 'full'))
  c.total_steps = 2
  train_and_evaluate(c, str(tmp_path / 'split'))
  c.total_steps = 4
  resumed = train_and_evaluate(c, str(tmp_path / 'split'))
  assert full['step'] == resumed['step'] == 4
  for name in ('params', 'ema_params', 'opt_state'):
    for a, b in zip(
        jax.tree.leaves(jax.device_get(getattr(full['state'], name))),
        jax.tree.leaves(jax.device_get(getattr(resumed['state'], name))),
    ):
      np.testing.assert_array_equal(a, b, err_msg=name)
  assert np.isfinite(full['loss']) and full['loss'] == resumed['loss']  # step 4's metrics
  c.model.input_size = 16
  with pytest.raises(ValueError, match='gives 8x8x4 inputs but model expects input_size=16'):
    train_and_evaluate(c, str(tmp_path / 'work2'))


def test_empty_or_missing_latent_source_is_refused(tmp_path):
  c = get_config()
  c.data = dict(
      name='latents',
      path=str(tmp_path),
      image_size=64,
      flip=True,
      num_threads=1,
      prefetch=2,
      vae=None,
  )
  with pytest.raises(FileNotFoundError, match='no \\*.array_record latent shards found'):
    pipeline.make_iterator(c.data, seed=0, global_batch=8)


def test_latent_samples_are_decoded_by_the_vae(tmp_path):
  """The sampler's output path for latent models: latents / scale -> VAE decoder -> uint8."""
  import jax
  from flax import nnx
  from mdt_jax import MDT, model_config
  from mdt_jax.sampling import SamplerConfig, build_sampler, generate
  from mdt_jax.images import to_uint8
  from mdt_jax.sampling import postprocess

  config = vae_lib.VAEConfig.from_dict(TINY)
  vae_lib.io.write_folder(str(tmp_path / 'vae'), config, vae_lib.random_params(config, seed=1))
  mdt = MDT(
      model_config(
          'S/2', input_size=4, hidden_size=16, depth=2, num_heads=2, decode_layer=0, num_classes=3
      ).to_dict(),
      rngs=nnx.Rngs(0),
  )
  params = nnx.state(mdt, nnx.Param)
  keys = jax.random.split(jax.random.key(0), len(jax.tree.leaves(params)))
  nnx.update(
      mdt,
      jax.tree.unflatten(
          jax.tree.structure(params),
          [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, jax.tree.leaves(params))],
      ),
  )
  sm = postprocess.SamplingModel(model=mdt, space='latent', vae_dir=str(tmp_path / 'vae'))
  post = postprocess.make_postprocess(sm)
  sampler = build_sampler(mdt, SamplerConfig(sampler='ddim', steps=3))
  labels = np.array([0, 1, 2, 1], np.int32)
  images = generate(sampler, labels, postprocess=post, batch_size=8)
  latents = generate(sampler, labels, batch_size=8)
  assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8  # TINY VAE: 2x upsampling
  want = to_uint8(np.asarray(vae_lib.load(str(tmp_path / 'vae')).decode(latents / LATENT_SCALE)))
  assert np.abs(images.astype(int) - want.astype(int)).max() <= 1
  assert images.std() > 0
