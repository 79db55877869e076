"""Input checks of the evaluation command and the .npz reader (no Inception weights needed)."""

import numpy as np
import pytest

from mdt_jax import evaluate as evaluate_cli
from mdt_jax.evaluation import evaluator
from mdt_jax.evaluation.features import NpzImages


def _images(n=4, size=16, dtype=np.uint8):
  return np.random.default_rng(n).integers(0, 256, (n, size, size, 3)).astype(dtype)


@pytest.fixture
def files(tmp_path):
  good = tmp_path / 'good.npz'
  np.savez(good, _images(5), np.arange(5))
  return tmp_path, str(good)


def _run(samples, reference, tmp_path):
  return evaluate_cli.main(
      [
          '--samples',
          samples,
          '--reference',
          reference,
          '--inception',
          str(tmp_path / 'absent.safetensors'),
          '--quiet',
      ]
  )


@pytest.mark.parametrize(
    'arrays, match',
    [
        ({'arr_0': _images(dtype=np.float32)}, 'dtype float32, expected uint8'),
        ({'arr_0': _images()[..., :1]}, r'expected \[N, H, W, 3\]'),
        ({'arr_0': _images()[0]}, r'expected \[N, H, W, 3\]'),
        ({'arr_0': _images(size=4)}, 'at least 8x8'),
        ({'arr_0': _images(n=1)}, 'at least 2'),
        ({'images': _images()}, 'expected arr_0'),
        ({'arr_0': _images(n=5), 'arr_1': np.zeros(4, np.int64)}, 'arr_1 must hold integer labels'),
        (
            {'arr_0': _images(n=5), 'arr_1': np.zeros(5, np.float32)},
            'arr_1 must hold integer labels',
        ),
    ],
)
def test_bad_samples(files, arrays, match):
  tmp_path, good = files
  bad = str(tmp_path / 'bad.npz')
  np.savez(bad, **arrays)
  with pytest.raises(ValueError, match=match):
    _run(bad, good, tmp_path)


@pytest.mark.parametrize(
    'arrays, match',
    [
        ({'features': np.zeros((4, 2048))}, 'expected an ADM reference batch'),
        ({'arr_0': _images(), 'mu': np.zeros(2048)}, 'not all of'),
        ({'arr_0': _images(dtype=np.int16)}, 'expected uint8'),
        ({'format': np.array('something else'), 'mu': np.zeros(3)}, 'not a statistics file'),
    ],
)
def test_bad_reference(files, arrays, match):
  tmp_path, good = files
  bad = str(tmp_path / 'bad_ref.npz')
  np.savez(bad, **arrays)
  with pytest.raises(ValueError, match=match):
    _run(good, bad, tmp_path)


def test_missing_or_foreign_files(files):
  tmp_path, good = files
  with pytest.raises(FileNotFoundError, match='no such file'):
    _run(str(tmp_path / 'nothing.npz'), good, tmp_path)
  text = tmp_path / 'notes.txt'
  text.write_text('not an npz')
  with pytest.raises(ValueError, match='not an .npz'):
    _run(good, str(text), tmp_path)
  # inputs are fine, the weights file is missing: the error says how to make it
  with pytest.raises(FileNotFoundError, match='convert_inception.py'):
    _run(good, good, tmp_path)
  with pytest.raises(ValueError, match='fid_method'):
    evaluator.evaluate(good, good, str(tmp_path / 'absent.npz'), fid_method='exact')


def test_reference_kinds(files):
  tmp_path, good = files
  assert evaluator.reference_kind(good) == 'adm'
  stats_only = str(tmp_path / 'stats_only.npz')
  np.savez(stats_only, mu=np.zeros(2), sigma=np.eye(2), mu_s=np.zeros(2), sigma_s=np.eye(2))
  assert evaluator.reference_kind(stats_only) == 'adm'
  saved = str(tmp_path / 'saved.npz')
  evaluator.save_statistics(
      saved, evaluator.Statistics(np.zeros(2), np.eye(2), np.ones(3), np.eye(3), None, 7, 'w', 's')
  )
  assert evaluator.reference_kind(saved) == 'stats'
  loaded = evaluator.load_statistics(saved)
  assert loaded.num_images == 7 and loaded.pool is None and loaded.weights == 'w'
  np.testing.assert_array_equal(loaded.mu_s, np.ones(3))


@pytest.mark.parametrize('compressed', [False, True])
def test_npz_images_streams_batches(tmp_path, compressed):
  images = _images(n=11, size=9)
  path = str(tmp_path / 'x.npz')
  (np.savez_compressed if compressed else np.savez)(path, images)
  reader = NpzImages(path)
  assert len(reader) == 11 and reader.dtype == np.uint8
  batches = list(reader.batches(4))
  assert [len(b) for b in batches] == [4, 4, 3]
  np.testing.assert_array_equal(np.concatenate(batches), images)


def test_format_table():
  table = evaluator.format_table(
      {
          'num_samples': 3,
          'num_reference': 4,
          'fid': 1.23456,
          'inception_score': None,
          'notes': ['n'],
      }
  )
  assert 'FID              1.2346' in table and 'Inception Score  n/a' in table
  assert 'note: n' in table
