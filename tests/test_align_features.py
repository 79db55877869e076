"""REPA's teacher features stored beside the latents: extraction with a random DINOv2 (the
image's and the flip's), the flip kept consistent when sampling, training REPA on latents, and
the refusals."""

import glob

import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from flax import nnx
from PIL import Image

import mdt_jax.vae as vae_lib
from micro_config import get_config
from mdt_jax.data import extract, image_sources, pipeline
from mdt_jax.data.records import decode_latent_record, encode_latent_record
from mdt_jax.models import dinov2
from mdt_jax.models.params import param_name
from mdt_jax.training.loop import train_and_evaluate
from mdt_jax.training.run import validate
from test_extract import TINY, make_folder

SIZE = 16


def _teacher(path, hidden=16) -> str:
  """A random DINOv2 folder seeing 16 px images as a 4 x 4 grid of 4 px patches."""
  config = dinov2.Dinov2Config(
      hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, image_size=SIZE, patch_size=4
  )
  model = dinov2.Dinov2(config, rngs=nnx.Rngs(0))
  params = {param_name(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
  return dinov2.save(str(path), config, params)


@pytest.fixture(scope='module')
def extracted(tmp_path_factory):
  """Images, a tiny VAE, a teacher, and the latents extracted with and without its features."""
  root = tmp_path_factory.mktemp('features')
  cfg = vae_lib.VAEConfig.from_dict(TINY)
  vae_lib.io.write_folder(str(root / 'vae'), cfg, vae_lib.random_params(cfg, seed=0))
  make_folder(root / 'images')
  teacher = _teacher(root / 'teacher')
  kwargs = dict(image_size=SIZE, batch_size=8, images_per_shard=32, num_workers=2)
  vae = vae_lib.load(str(root / 'vae'))
  source = lambda: image_sources.folder_source(str(root / 'images'))  # noqa: E731
  manifest = extract.extract(
      source(),
      vae,
      str(root / 'with'),
      align_encoder=dinov2.load(teacher),
      align_resolution=SIZE,
      **kwargs,
  )
  extract.extract(source(), vae, str(root / 'without'), **kwargs)
  return root, teacher, manifest


def _records(folder):
  out = []
  for path in sorted(glob.glob(str(folder / '*.array_record'))):
    reader = ArrayRecordReader(path)
    out.extend(reader.read_all())
    reader.close()
  return out


def test_features_of_the_image_and_of_its_flip(extracted):
  root, teacher, manifest = extracted
  info = manifest['align_features']
  assert info['features_shape'] == [16, 16] and info['dtype'] == 'float16'
  assert info['resolution'] == SIZE and info['config']['patch_size'] == 4
  records = [decode_latent_record(r) for r in _records(root / 'with')]
  good = [f'cat/cat_{k:02d}.png' for k in range(12)] + [f'dog/dog_{k:02d}.png' for k in range(9)]
  images = np.stack([image_sources.preprocess(Image.open(root / 'images' / g), SIZE) for g in good])
  x = jnp.asarray(images.astype(np.float32) / 127.5 - 1)
  model = dinov2.load(teacher)
  want = np.asarray(model.patch_tokens(dinov2.normalize(x, SIZE)))
  want_flip = np.asarray(model.patch_tokens(dinov2.normalize(x[:, :, ::-1], SIZE)))
  for k, r in enumerate(records):
    assert r['align'].dtype == np.float16 and r['align'].shape == (16, 16)
    np.testing.assert_allclose(r['align'], want[k], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(r['align_flip'], want_flip[k], rtol=2e-3, atol=2e-3)
  assert not np.allclose(records[0]['align'], records[0]['align_flip'])
  # records without features read as before
  assert 'align' not in decode_latent_record(_records(root / 'without')[0])
  assert pipeline.align_features(str(root / 'with')) == (16, 16)
  assert pipeline.align_features(str(root / 'without')) is None


def test_a_flipped_latent_gets_the_flipped_features():
  m = np.zeros((2, 2, 8), np.float32)
  m[..., 4:] = -20.0  # log-variance: almost no posterior noise
  m_flip = m.copy()
  m_flip[..., :4] = 100.0  # the flip's mean
  a = np.full((4, 3), 1.0)
  rec = encode_latent_record(m, m_flip, 3, align=a, align_flip=-a)
  seen = set()
  for seed in range(16):
    out = pipeline.sample_latent(rec, np.random.default_rng(seed), flip=True, align=True)
    flipped = np.random.default_rng(seed).random() < 0.5  # the same draw
    assert out['align'][0, 0] == (-1.0 if flipped else 1.0)
    assert (out['x'].mean() > 10) == flipped  # the flipped moments, too
    seen.add(flipped)
  assert seen == {True, False}
  # the same draws as without features: the latent is unchanged
  plain = pipeline.sample_latent(rec, np.random.default_rng(5), flip=True)
  np.testing.assert_array_equal(
      plain['x'], pipeline.sample_latent(rec, np.random.default_rng(5), True, True)['x']
  )
  with pytest.raises(ValueError, match='align_flip'):
    encode_latent_record(m, m, 0, align=a)
  bare = encode_latent_record(m, m, 0)
  with pytest.raises(ValueError, match='--align_encoder'):
    pipeline.sample_latent(bare, np.random.default_rng(0), align=True)


def _latent_config(root, teacher, folder):
  c = get_config()
  c.data = dict(
      name='latents',
      path=str(root / folder),
      image_size=SIZE,
      flip=True,
      num_threads=1,
      prefetch=2,
      vae=str(root / 'vae'),
  )
  c.model.input_size, c.model.in_channels, c.model.num_classes = 8, 4, 2
  c.model.mask_ratio = 0.3
  c.global_batch_size, c.total_steps, c.checkpoint_every_steps, c.log_every_steps = 8, 2, 2, 1
  c.align.update(method='repa', teacher=teacher, projector_dim=32, branches='both')
  return c


def test_repa_trains_on_latents_with_stored_features(extracted, tmp_path):
  root, teacher, _ = extracted
  out = train_and_evaluate(_latent_config(root, teacher, 'with'), str(tmp_path / 'w'))
  assert out['step'] == 2 and np.isfinite(out['loss'])
  assert -2.0 <= out['align/loss'] <= 2.0 and 'masked/align_loss' in out


def test_repa_on_latents_without_features_is_refused(extracted, tmp_path):
  root, teacher, _ = extracted
  with pytest.raises(ValueError, match='--align_encoder'):
    validate(_latent_config(root, teacher, 'without'))
  other = _teacher(tmp_path / 'wide', hidden=32)
  with pytest.raises(ValueError, match='16 wide'):
    validate(_latent_config(root, other, 'with'))
