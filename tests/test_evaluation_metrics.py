"""FID / IS / precision-recall against independent NumPy / SciPy computations and known cases."""

import numpy as np
import pytest
from scipy import linalg, stats
from scipy.spatial.distance import cdist

from mdt_jax.evaluation import metrics


def _random_stats(rng, n, d):
  x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + rng.standard_normal(d)
  return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_matches_independent_formulas():
  rng = np.random.default_rng(0)
  mu1, s1 = _random_stats(rng, 400, 24)
  mu2, s2 = _random_stats(rng, 300, 24)
  # independent: trace of the root of S1 S2 from the eigenvalues of the (non-symmetric) product
  tr = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
  for method in ('eigh', 'sqrtm'):
    got = metrics.frechet_distance(mu1, s1, mu2, s2, method=method)
    assert got == pytest.approx(want, rel=1e-9)
  # diagonal Gaussians: sum of (sqrt a - sqrt b)^2 plus the squared mean difference
  a, b = rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
  got = metrics.frechet_distance(np.zeros(8), np.diag(a), np.ones(8), np.diag(b))
  assert got == pytest.approx(8 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-12)


def test_frechet_distance_identical_sets_is_zero_and_symmetric():
  rng = np.random.default_rng(1)
  feats = rng.standard_normal((200, 16))
  mu, sigma = metrics.feature_statistics(feats)
  np.testing.assert_allclose(mu, feats.mean(0))
  np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False))
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
  mu2, sigma2 = metrics.feature_statistics(feats[:100] + 0.5)
  assert metrics.frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(
      metrics.frechet_distance(mu2, sigma2, mu, sigma), rel=1e-9
  )


def test_frechet_distance_singular_covariances_agree():
  rng = np.random.default_rng(2)
  x, y = rng.standard_normal((6, 12)), rng.standard_normal((5, 12)) + 1  # N < D: rank-deficient
  with pytest.warns(UserWarning, match='singular'):
    (mu1, s1), (mu2, s2) = metrics.feature_statistics(x), metrics.feature_statistics(y)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  # independent: through the Gram matrices, tr sqrt(S1 S2) = nuclear norm of X1c X2c^T / sqrt(..)
  g = (x - x.mean(0)) @ (y - y.mean(0)).T / np.sqrt(5 * 4)
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.linalg.norm(g, 'nuc')
  # zero eigenvalues come out as +-1e-16 noise, whose square roots add ~1e-8 each
  assert got == pytest.approx(want, abs=1e-6)


def test_statistics_and_frechet_errors():
  with pytest.raises(ValueError, match='at least 2'):
    metrics.feature_statistics(np.zeros((1, 4)))
  with pytest.raises(ValueError, match=r'\[N, D\]'):
    metrics.feature_statistics(np.zeros(4))
  with pytest.raises(ValueError, match='NaN'):
    metrics.feature_statistics(np.full((3, 2), np.nan))
  with pytest.raises(ValueError, match='do not match'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match='method'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method='svd')


def _is_reference(logits, split):
  """Independent IS: scipy softmax and entropy-based KL, per split."""
  from scipy.special import softmax

  p = softmax(logits.astype(np.float64), axis=1)
  scores = []
  for i in range(0, len(p), split):
    part = p[i : i + split]
    scores.append(np.exp(np.mean([stats.entropy(row, part.mean(0)) for row in part])))
  return np.mean(scores)


def test_inception_score():
  rng = np.random.default_rng(3)
  assert metrics.inception_score(np.zeros((50, 10))) == pytest.approx(1.0, abs=1e-12)
  # confident, evenly spread predictions over C classes score C
  onehot = np.repeat(np.eye(7) * 60.0, 6, axis=0)
  assert metrics.inception_score(onehot) == pytest.approx(7.0, rel=1e-9)
  logits = rng.standard_normal((23, 12)) * 3
  for split in (5000, 5, 7):  # the last split is shorter when N is not a multiple
    assert metrics.inception_score(logits, split) == pytest.approx(
        _is_reference(logits, split), rel=1e-9
    )
  assert metrics.inception_score(logits, 5) != pytest.approx(metrics.inception_score(logits))
  # probabilities that underflow in float32 do not give NaN
  assert np.isfinite(metrics.inception_score(onehot * 100))


def _pr_reference(ref, smp, k):
  """Brute force with float64 SciPy distances (squared, as the ADM evaluator compares them)."""
  d_rr, d_ss, d_sr = (cdist(a, b, 'sqeuclidean') for a, b in ((ref, ref), (smp, smp), (smp, ref)))
  r_ref, r_smp = np.sort(d_rr, 1)[:, k], np.sort(d_ss, 1)[:, k]
  precision = np.mean(np.any(d_sr <= r_ref[None, :], axis=1))
  recall = np.mean(np.any(d_sr.T <= r_smp[None, :], axis=1))
  return precision, recall, r_ref


def test_precision_recall_matches_brute_force():
  rng = np.random.default_rng(4)
  ref = rng.standard_normal((90, 16)).astype(np.float32)
  smp = (rng.standard_normal((70, 16)) * 1.3 + 0.4).astype(np.float32)
  want_p, want_r, want_radii = _pr_reference(ref, smp, 3)
  # blocks that do not divide N exercise the padded last block
  np.testing.assert_allclose(metrics.manifold_radii(ref, 3, block=32), want_radii, rtol=1e-4)
  p, r = metrics.precision_recall(ref, smp, k=3, block=32)
  assert (p, r) == pytest.approx((want_p, want_r), abs=1e-12)
  assert 0 < p < 1 and 0 < r < 1
  p5, r5 = metrics.precision_recall(ref, smp, k=5, block=1000)
  assert (p5, r5) == pytest.approx(_pr_reference(ref, smp, 5)[:2], abs=1e-12)


def test_precision_recall_constructed_cases():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((40, 8)).astype(np.float32)
  assert metrics.precision_recall(x, x) == (1.0, 1.0)
  far = x + 1000.0
  assert metrics.precision_recall(x, far) == (0.0, 0.0)
  # samples drawn from a sub-region of the reference: all precise, recall partial
  p, r = metrics.precision_recall(x, x[:10])
  assert p == 1.0 and r < 1.0


def test_precision_recall_errors():
  with pytest.raises(ValueError, match='more than 3'):
    metrics.manifold_radii(np.zeros((3, 4)), k=3)
  with pytest.raises(ValueError, match='feature sizes differ'):
    metrics.precision_recall(np.zeros((10, 4)), np.zeros((10, 5)))
  with pytest.raises(ValueError, match='split_size'):
    metrics.inception_score(np.zeros((4, 3)), split_size=0)


def test_sqrtm_route_matches_scipy_directly():
  rng = np.random.default_rng(6)
  mu1, s1 = _random_stats(rng, 100, 10)
  mu2, s2 = _random_stats(rng, 100, 10)
  root = linalg.sqrtm(s1 @ s2).real
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
  assert metrics.frechet_distance(mu1, s1, mu2, s2, method='sqrtm') == pytest.approx(
      want, rel=1e-12
  )
