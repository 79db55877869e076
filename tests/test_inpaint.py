"""Inpainting (mdt_jax.sampling.inpaint, python -m mdt_jax.inpaint): known regions kept, the
limits of all-known and all-unknown masks, both methods, DDPM and flow, bad masks, the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdt_jax.images import to_uint8
from mdt_jax.sampling import SamplerConfig, build_sampler, data_mesh, generate
from mdt_jax.sampling import inpaint as inp
import launch
from micro_config import random_mdt, save_pixel_folder

NUM_CLASSES = 10


def velocity_fn(x, t, y):
  """A smooth flow-model stand-in (velocity of C channels)."""
  tt = (t.astype(jnp.float32) / 1000)[:, None, None, None]
  return 0.5 * jnp.tanh(x) + 0.3 * jnp.sin(3 * tt + y.astype(jnp.float32)[:, None, None, None])


def data(n=5, size=8, channels=1, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (n, size, size, channels)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  masks = np.zeros((n, size, size), bool)
  masks[:, : size // 2] = True  # top half known
  masks[1, :, :3] = True  # partial patches (patch size 2)
  masks[2] = rng.random((size, size)) < 0.5  # scattered pixels
  return images, labels, masks


@pytest.fixture(scope='module')
def model():
  return random_mdt(in_channels=1, mask_ratio=0.3)  # masking: the side-interpolater runs


def test_mdt_method_keeps_known_pixels_and_reduces_to_plain_sampling(model):
  images, labels, masks = data()
  cfg = SamplerConfig(sampler='ddpm', steps=4, cfg_scale=2.0, guided_channels='all')
  mdt = inp.build_inpainter(model, cfg, inp.InpaintConfig(method='mdt', mdt_fraction=0.5))
  out = inp.inpaint(mdt, images, masks, labels, seed=3, batch_size=8)
  k = np.broadcast_to(masks[..., None], out.shape)
  np.testing.assert_array_equal(out[k], images[k])  # exact in pixel space
  assert np.isfinite(out).all() and np.abs(out[~k] - images[~k]).mean() > 0.1
  # All known: the input back. All unknown: plain sampling with the same draws.
  every = inp.inpaint(mdt, images, np.ones_like(masks), labels, seed=3, batch_size=8)
  np.testing.assert_array_equal(every, images)
  none = inp.inpaint(mdt, images, np.zeros_like(masks), labels, seed=3, batch_size=8)
  plain = generate(build_sampler(model, cfg), labels, seed=3, batch_size=8, log_every=0)
  # two compiled programs (the inpainting loop, the sampler's) may fuse and round differently:
  # a few float32 ulps of this random model's samples, which reach a few hundred
  np.testing.assert_allclose(none, plain, rtol=1e-5, atol=1e-5)
  # The masked pass is used: the repaint method (same draws) gives another completion.
  rep = mdt.with_config(inp.InpaintConfig(method='repaint'))  # same program, no masked step
  rep_out = inp.inpaint(rep, images, masks, labels, seed=3, batch_size=8)
  np.testing.assert_array_equal(rep_out[k], images[k])
  assert np.abs(rep_out[~k] - out[~k]).max() > 1e-3


def test_masked_pass_with_a_count_per_sample_and_a_full_buffer(model):
  """The inpainting form of the masked pass (len_keep [B, 1], keep_buffer=L) equals the
  training form (one scalar count, the ratio's buffer) sample by sample."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
  t, y = jnp.array([10, 500]), jnp.array([1, 2])
  ids = jnp.asarray(np.stack([rng.permutation(16), rng.permutation(16)]), jnp.int32)
  counts = (5, 11)  # 11: the largest the 0.3 ratio keeps
  run = jax.jit(
      lambda *a, buffer=None: model(*a[:3], ids_shuffle=a[3], len_keep=a[4], keep_buffer=buffer),
      static_argnames='buffer',
  )
  both = run(x, t, y, ids, jnp.array([[c] for c in counts]), buffer=16)
  for i, c in enumerate(counts):
    one = run(x[i : i + 1], t[i : i + 1], y[i : i + 1], ids[i : i + 1], jnp.int32(c))
    np.testing.assert_allclose(both[i : i + 1], one, atol=2e-5)
  with pytest.raises(ValueError, match='keep_buffer must be in'):
    model(x, t, y, ids_shuffle=ids, len_keep=3, keep_buffer=17)


def test_token_masks_need_every_pixel_of_a_patch():
  m = np.zeros((2, 4, 4), bool)
  m[0, :2] = True
  m[0, 2, 0] = True  # one pixel of token (1, 0): unknown
  m[1] = True
  known = np.asarray(inp.token_masks(m, 2))
  np.testing.assert_array_equal(known, [[1, 1, 0, 0], [1, 1, 1, 1]])
  ids, keep = inp.mask_order(jnp.asarray([[0, 1, 0, 1], [0, 0, 0, 0]], bool))
  np.testing.assert_array_equal(ids, [[1, 3, 0, 2], [0, 1, 2, 3]])  # known first, in order
  np.testing.assert_array_equal(keep[:, 0], [2, 4])  # nothing known: the plain pass
  np.testing.assert_array_equal(
      inp.downsample_masks(np.ones((1, 4, 4), bool) & (np.arange(4) < 3)[None, None], 2)[0],
      [[1, 0], [1, 0]],
  )


def test_flow_samplers_resampling_and_device_count(model):
  images, labels, masks = data(n=3)
  shape, kw = images.shape[1:], dict(image_shape=images.shape[1:], num_classes=NUM_CLASSES)
  em = SamplerConfig(sampler='euler_maruyama', steps=4, objective='flow', cfg_scale=1.5)
  none = inp.inpaint(
      inp.build_inpainter(velocity_fn, em, **kw), images, np.zeros_like(masks), labels, seed=1
  )
  plain = generate(
      build_sampler(velocity_fn, em, image_shape=shape, num_classes=NUM_CLASSES),
      labels,
      seed=1,
      log_every=0,
  )
  # two compiled programs (the inpainting loop, the sampler's) may fuse and round differently:
  # a few float32 ulps of this random model's samples, which reach a few hundred
  np.testing.assert_allclose(none, plain, rtol=1e-5, atol=1e-5)
  heun = SamplerConfig(sampler='heun', steps=4, objective='flow')
  icfg = inp.InpaintConfig(method='repaint', resample=3)
  outs = [
      inp.inpaint(
          inp.build_inpainter(velocity_fn, heun, icfg, mesh=data_mesh(d), **kw),
          images,
          masks,
          labels,
          seed=2,
          batch_size=4,
      )
      for d in (jax.devices()[:1], jax.devices())
  ]
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)  # device-count invariant
  k = np.broadcast_to(masks[..., None], images.shape)
  np.testing.assert_array_equal(outs[1][k], images[k])


def test_bad_input_is_refused(model):
  images = np.zeros((2, 8, 8, 1), np.float32)
  with pytest.raises(ValueError, match=r'masks must have shape \[N, H, W\] = \(2, 8, 8\)'):
    inp.check_masks(np.ones((2, 4, 4)), images.shape)
  with pytest.raises(ValueError, match='binary.*0.5'):
    inp.check_masks(np.full((2, 8, 8), 0.5), images.shape)
  with pytest.raises(ValueError, match='bool or 0/1'):
    inp.check_masks(np.full((2, 8, 8), 'a'), images.shape)
  cfg = SamplerConfig(sampler='ddim', steps=3)
  with pytest.raises(ValueError, match='DPM-Solver'):
    inp.build_inpainter(model, SamplerConfig(sampler='dpm_solver++', steps=3))
  with pytest.raises(ValueError, match="'mdt' method needs an MDT"):
    inp.build_inpainter(
        velocity_fn,
        cfg,
        inp.InpaintConfig(method='mdt'),
        image_shape=(8, 8, 1),
        num_classes=NUM_CLASSES,
    )
  for bad in (dict(method='x'), dict(resample=0), dict(mdt_fraction=1.5)):
    with pytest.raises(ValueError, match=list(bad)[0]):
      inp.InpaintConfig(**bad)
  with pytest.raises(ValueError, match=r'class ids must be in \[0, 11\)'):  # 10: null class
    inp.inpaint(inp.build_inpainter(model, cfg), images, np.ones((2, 8, 8)), [10, 11])
  with pytest.raises(ValueError, match=r'images must have shape \[N, 8, 8, 1\]'):
    inp.check_images(np.zeros((2, 8, 8, 3), np.float32), (8, 8, 1))


def _run_cli(*argv):
  from mdt_jax import inpaint

  launch.run_main(inpaint, *argv)


def test_cli_pixel_and_latent_model_folders(tmp_path, model, monkeypatch):
  """python -m mdt_jax.inpaint on model folders, every path relative: a pixel model, then a
  latent model with its VAE (random weights)."""
  from mdt_jax import vae as vae_lib
  from mdt_jax.hub.folder import save_model_folder
  from test_extract import TINY

  save_pixel_folder(
      tmp_path / 'model',
      model,
      sampler='ddpm',
      steps=3,
      cfg_scale=2.0,
      scale_pow=4.0,
      guidance_channels=1,
  )  # guided channels: all
  images, labels, masks = data(n=3)
  u8 = np.repeat(np.round((images + 1) * 127.5).astype(np.uint8), 3, axis=-1)  # RGB grey
  np.savez(tmp_path / 'images.npz', u8, labels)
  np.savez(tmp_path / 'masks.npz', masks.astype(np.uint8))
  monkeypatch.chdir(tmp_path)
  _run_cli(
      '--model=model',
      '--images=images.npz',
      '--masks=masks.npz',
      '--out=out',
      '--method=mdt',
      '--steps=4',
      '--batch_size=8',
  )  # as the first test: its compile
  with np.load(tmp_path / 'out' / 'inpainted.npz') as f:
    out, ys = f['arr_0'], f['arr_1']
  assert out.shape == (3, 8, 8, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(ys, labels)
  k = np.broadcast_to(masks[..., None], out.shape)
  assert np.abs(out[k].astype(int) - u8[k]).max() <= 1  # float -> uint8 rounding
  assert np.abs(out[~k].astype(int) - u8[~k]).mean() > 5
  run = json.loads((tmp_path / 'out' / 'run.json').read_text())
  assert run['inpaint'] == dict(method='mdt', resample=1, mdt_fraction=0.5)
  assert run['sampler']['steps'] == 4 and run['sampler']['cfg_scale'] == 2.0
  assert (tmp_path / 'out' / 'inpaint_grid.png').is_file()
  with pytest.raises(ValueError, match='binary'):
    np.savez(tmp_path / 'bad.npz', masks * 0.5)
    _run_cli('--model=model', '--images=images.npz', '--masks=bad.npz', '--out=bad')
  assert not (tmp_path / 'bad').exists()

  # A latent model (4x4x4 latents of the TINY VAE's 8x8 RGB images).
  config = vae_lib.VAEConfig.from_dict(TINY)
  vae_lib.io.write_folder(str(tmp_path / 'vae'), config, vae_lib.random_params(config, seed=1))
  latent = random_mdt(seed=1, in_channels=4, input_size=4, learn_sigma=False, mask_ratio=0.3)
  save_model_folder(
      str(tmp_path / 'latent'),
      nnx.state(latent, nnx.Param),
      latent.config,
      data=dict(space='latent', image_size=8, vae='vae'),
      diffusion=dict(objective='flow', num_timesteps=1000),
      sampling=dict(sampler='euler', steps=2, cfg_scale=1.5),
  )
  rgb = np.round((np.repeat(images, 3, -1) + 1) * 127.5).astype(np.uint8)
  np.savez(tmp_path / 'rgb.npz', rgb)
  _run_cli(
      '--model=latent',
      '--images=rgb.npz',
      '--masks=masks.npz',
      '--out=lat',
      '--labels=none',
      '--method=repaint',
      '--resample=2',
  )
  with np.load(tmp_path / 'lat' / 'inpainted.npz') as f:
    assert f['arr_0'].shape == (3, 8, 8, 3) and f['arr_0'].std() > 0
    np.testing.assert_array_equal(f['arr_1'], [NUM_CLASSES] * 3)  # the null class
  assert json.loads((tmp_path / 'lat' / 'run.json').read_text())['sampler']['cfg_scale'] is None


def test_study_masks_and_report_tables():
  from studies import inpainting as study, inpainting_report as report
  from studies import inpainting_setup as setup

  low, right, rnd = (setup.study_masks(k, 3, 16, 4) for k in setup.MASKS)
  assert low[:, :8].all() and not low[:, 8:].any()
  assert right[:, :, :8].all() and not right[:, :, 8:].any()
  tokens = np.asarray(inp.token_masks(rnd, 4))
  assert (tokens.sum(1) == 8).all()  # half of 16 tokens
  np.testing.assert_array_equal(np.asarray(inp.token_masks(~rnd, 4)), ~tokens)  # whole patches
  assert not np.array_equal(tokens[0], tokens[1])  # one draw per image
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
  np.testing.assert_array_equal(
      setup.decode_examples(setup.encode_examples(x)), np.repeat(to_uint8(x)[..., :1], 3, -1)
  )
  methods = study.method_names([0.5])
  cells = {
      f'{c}/{k}/{m}/{s}': dict(class_accuracy=0.5 + s / 10, fd=1.0, known_mae=0.0, unknown_rmse=0.3)
      for c in setup.CONDITIONS
      for k in setup.MASKS
      for m in methods
      for s in (0, 1)
  }
  results = dict(
      setup=dict(masks=list(setup.MASKS), methods=methods, seeds=[0, 1]),
      cells=cells,
      reference={
          f'{k}/known_only': dict(class_accuracy=0.1, fd=9.0, known_mae=0.0, unknown_rmse=0.9)
          for k in setup.MASKS
      },
  )
  results['summary'] = report.summarize(results)
  acc = results['summary']['none/lower_half/mdt@0.5']['class_accuracy']
  assert acc['mean'] == pytest.approx(0.55) and acc['std'] == pytest.approx(0.05)
  text = '\n'.join(report.table(results))
  assert '| MDT side-interpolater (first 50% of steps) | 0.550 ± 0.050 |' in text
  assert text.count('(known pixels only') == len(setup.MASKS)
