"""Latent extraction end to end on a small image folder with a small random VAE."""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader
from PIL import Image

import mdt_jax.vae as vae_lib
from mdt_jax.data import extract, image_sources
from mdt_jax.data.records import decode_latent_record

SIZE = 16
TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)


@pytest.fixture(scope='module')
def vae(tmp_path_factory):
  config = vae_lib.VAEConfig.from_dict(TINY)
  path = tmp_path_factory.mktemp('vae') / 'vae'
  vae_lib.io.write_folder(str(path), config, vae_lib.random_params(config, seed=0))
  return vae_lib.load(str(path))


def make_folder(root) -> dict:
  """2 classes of small PNGs (odd sizes, grey and RGBA ones too) and one corrupt file."""
  rng = np.random.default_rng(0)
  shapes = [(20, 17, 'RGB'), (70, 40, 'L'), (33, 33, 'RGBA'), (16, 16, 'RGB'), (50, 90, 'RGB')]
  files = {'cat': 12, 'dog': 9}
  for cls, count in files.items():
    os.makedirs(root / cls)
    for k in range(count):
      w, h, mode = shapes[k % len(shapes)]
      chans = {'RGB': 3, 'L': 1, 'RGBA': 4}[mode]
      arr = rng.integers(0, 256, (h, w, chans), dtype=np.uint8)
      Image.fromarray(arr.squeeze(-1) if chans == 1 else arr, mode).save(
          root / cls / f'{cls}_{k:02d}.png'
      )
  (root / 'dog' / 'dog_99.png').write_bytes(b'not a png at all')
  (root / 'dog' / 'notes.txt').write_text('ignored: not an image extension')
  return files


def read_shards(out):
  records = []
  for path in sorted(glob.glob(str(out / 'latents-*.array_record'))):
    reader = ArrayRecordReader(path)
    records.extend(decode_latent_record(r) for r in reader.read_all())
    reader.close()
  return records


def test_extract_folder_end_to_end(tmp_path, vae):
  make_folder(tmp_path / 'images')
  source = image_sources.folder_source(str(tmp_path / 'images'))
  assert source.class_names == ['cat', 'dog'] and len(source) == 22
  out = tmp_path / 'out'
  # 20 images per shard in batches of 8: the first shard spans 3 batches, the last is padded.
  kwargs = dict(image_size=SIZE, batch_size=8, images_per_shard=20, num_workers=2)
  manifest = extract.extract(source, vae, str(out), **kwargs)

  names = sorted(os.listdir(out))
  assert [s for s in names if s.startswith('latents')] == [
      'latents-00000-of-00002.array_record',
      'latents-00001-of-00002.array_record',
  ]
  assert not [s for s in names if s.endswith('.tmp')]
  records = read_shards(out)
  good = [f'cat/cat_{k:02d}.png' for k in range(12)] + [f'dog/dog_{k:02d}.png' for k in range(9)]
  assert [r['label'] for r in records] == [0] * 12 + [1] * 9

  images = np.stack(
      [image_sources.preprocess(Image.open(tmp_path / 'images' / g), SIZE) for g in good]
  )
  x = images.astype(np.float32) / 127.5 - 1
  mean, logvar = vae.encode(x)
  mean_f, logvar_f = vae.encode(x[:, :, ::-1])
  for k, r in enumerate(records):
    assert r['moments'].shape == (SIZE // 2, SIZE // 2, 8) and r['moments'].dtype == np.float32
    np.testing.assert_allclose(
        r['moments'], np.concatenate([mean[k], logvar[k]], -1), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        r['moments_flip'], np.concatenate([mean_f[k], logvar_f[k]], -1), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(r['moments'], r['moments_flip'])  # the flip really is another input

  skipped = (out / 'skipped.txt').read_text().splitlines()
  assert len(skipped) == 1 and skipped[0].startswith('dog/dog_99.png\t')
  on_disk = json.loads((out / 'manifest.json').read_text())
  assert on_disk == manifest
  assert manifest['class_names'] == ['cat', 'dog']
  assert manifest['images_per_class'] == {'cat': 12, 'dog': 9}
  assert manifest['num_images'] == 21 and manifest['num_skipped'] == 1
  assert manifest['num_shards'] == 2 and [s['records'] for s in manifest['shards']] == [20, 1]
  assert manifest['bytes'] == sum(os.path.getsize(out / s['file']) for s in manifest['shards'])

  # A restart redoes only the missing shard; the finished one is not touched.
  first, second = (out / s['file'] for s in manifest['shards'])
  stamp, second_bytes = first.stat().st_mtime_ns, second.read_bytes()
  second.unlink()
  again = extract.extract(
      image_sources.folder_source(str(tmp_path / 'images')), vae, str(out), **kwargs
  )
  assert again == manifest
  assert first.stat().st_mtime_ns == stamp
  assert second.read_bytes() == second_bytes

  with pytest.raises(ValueError, match='images_per_shard'):
    extract.extract(source, vae, str(out), **{**kwargs, 'images_per_shard': 3})


def test_prefix_labels_and_bad_sources(tmp_path):
  root = tmp_path / 'flat'
  os.makedirs(root)
  for name in ('n02_b.png', 'n01_a.jpg', 'n02_a.png'):
    (root / name).write_bytes(b'')
  src = image_sources.folder_source(str(root), label_from='prefix')
  assert src.class_names == ['n01', 'n02']
  assert [src.keys(i) for i in range(3)] == ['n01_a.jpg', 'n02_a.png', 'n02_b.png']
  with pytest.raises(ValueError, match='directly in'):
    image_sources.folder_source(str(root))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    image_sources.folder_source(str(tmp_path / 'missing'))
  os.makedirs(tmp_path / 'empty' / 'cls')
  with pytest.raises(ValueError, match='no images'):
    image_sources.folder_source(str(tmp_path / 'empty'))


def test_batch_size_must_divide_over_devices(vae):
  with pytest.raises(ValueError, match='multiple of the 8 devices'):
    extract.make_pair_encoder(vae, 12)


def test_center_crop_follows_adm():
  rng = np.random.default_rng(1)
  exact = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
  np.testing.assert_array_equal(image_sources.center_crop_arr(exact, SIZE), np.asarray(exact))
  # 4x the size: two BOX halvings land exactly on SIZE (a direct bicubic resize would differ).
  big = Image.fromarray(rng.integers(0, 256, (4 * SIZE, 4 * SIZE, 3), dtype=np.uint8))
  boxed = big.resize((2 * SIZE, 2 * SIZE), Image.BOX).resize((SIZE, SIZE), Image.BOX)
  np.testing.assert_array_equal(image_sources.center_crop_arr(big, SIZE), np.asarray(boxed))
  # Landscape: the short side becomes SIZE, then the centre columns are kept.
  wide = Image.fromarray(rng.integers(0, 256, (SIZE, 3 * SIZE + 1, 3), dtype=np.uint8))
  out = image_sources.center_crop_arr(wide, SIZE)
  np.testing.assert_array_equal(out, np.asarray(wide)[:, SIZE : 2 * SIZE])


class MdtJaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """Five tiny images in two classes, prepared in array_record format like imagenet2012."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(None, None, 3)),
                'label': tfds.features.ClassLabel(names=['n01', 'n02']),
            }
        ),
    )

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(5):
      yield i, {'image': rng.integers(0, 256, (20 + i, 17, 3), dtype=np.uint8), 'label': i % 2}


def test_tfds_source_end_to_end(tmp_path, vae, monkeypatch):
  data_dir = str(tmp_path / 'tfds')
  builder = MdtJaxTinyImages(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  source = image_sources.tfds_source('mdt_jax_tiny_images', 'train', data_dir)
  assert source.class_names == ['n01', 'n02'] and len(source) == 5
  stored = list(builder.as_data_source(split='train'))  # TFDS's order (shuffled by key)
  labels = [int(ex['label']) for ex in stored]
  assert sorted(labels) == [0, 0, 0, 1, 1]
  image, label = source.load(3)
  assert label == labels[3] and np.array_equal(np.asarray(image), stored[3]['image'])  # lossless

  manifest = extract.extract(
      source,
      vae,
      str(tmp_path / 'out'),
      image_size=SIZE,
      batch_size=8,
      images_per_shard=8,
      num_workers=2,
  )
  assert manifest['images_per_class'] == {'n01': 3, 'n02': 2}
  records = read_shards(tmp_path / 'out')
  assert [r['label'] for r in records] == labels
  x = image_sources.preprocess(Image.fromarray(stored[4]['image']), SIZE)[None] / 127.5 - 1
  mean, logvar = vae.encode(x.astype(np.float32))
  np.testing.assert_allclose(
      records[4]['moments'], np.concatenate([mean[0], logvar[0]], -1), rtol=1e-5, atol=1e-5
  )

  with pytest.raises(FileNotFoundError, match='cannot open TFDS dataset'):
    image_sources.tfds_source('mdt_jax_tiny_images', 'train', str(tmp_path / 'nowhere'))
  monkeypatch.setattr(tfds, 'data_source', lambda name, **kw: [])
  with pytest.raises(ValueError, match='is empty'):
    image_sources.tfds_source('mdt_jax_tiny_images', 'train', data_dir)
