"""FID, sFID, Inception Score and improved precision / recall, as the ADM evaluator defines them.

* Frechet distance of (mean, covariance) statistics, ``np.cov(rowvar=False)`` covariances (N - 1
  denominator): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). The trace of the root comes from a
  symmetric eigen-decomposition by default; ``method='sqrtm'`` follows the ADM code literally
  (``scipy.linalg.sqrtm``, eps=1e-6 on the diagonals only if the root is not finite).
  FID uses the 2048-d pool features, sFID the 2023-d spatial ones.
* Inception Score: the predictions are cut into consecutive splits of ``split_size`` (5000; the
  last split may be shorter), each scores exp(mean_i KL(p(y|x_i) || p(y))), the result is the mean
  over splits. Computed from logits in float64 with log-softmax, so probabilities that underflow in
  float32 do not turn into NaN.
* Precision / recall (Kynkaanniemi et al. 2019, ``ManifoldEstimator`` with k=3): the radius of a
  point is its squared distance to its k-th nearest neighbour in its own set (itself excluded);
  precision is the fraction of samples inside some reference ball, recall the fraction of
  references inside some sample ball (``<=``). Distances are squared Euclidean, computed in blocks
  of rows against all columns in float32 (the ADM evaluator first tries float16).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

HIGHEST = jax.lax.Precision.HIGHEST


def _features_2d(features, name: str = 'features') -> np.ndarray:
  features = np.asarray(features)
  if features.ndim != 2:
    raise ValueError(f'{name} must be a 2-D array [N, D], got shape {features.shape}')
  if not np.isfinite(features).all():
    raise ValueError(f'{name} contain NaN or inf values')
  return features


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) in float64 of features [N, D]; needs N >= 2."""
  features = _features_2d(features)
  n, d = features.shape
  if n < 2:
    raise ValueError(f'a covariance needs at least 2 feature vectors, got {n}')
  if n <= d:
    warnings.warn(
        f'{n} feature vectors for {d} dimensions: the covariance is singular, so the '
        'Frechet distance is biased upwards (the ADM protocol uses 50,000 samples)',
        stacklevel=2,
    )
  features = features.astype(np.float64)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = 'eigh') -> float:
  """Frechet distance between Gaussians (mu1, sigma1) and (mu2, sigma2).

  ``method='sqrtm'`` takes the ADM evaluator's route (``scipy.linalg.sqrtm`` of sigma1 @ sigma2,
  eps fallback, imaginary-part check). ``'eigh'`` (default) gets the same trace of the root from
  the eigenvalues of a symmetric matrix similar to sigma1 @ sigma2 (L^T sigma2 L with
  sigma1 = L L^T, or H^T sigma2 H with sigma1 = H H^T on its range when it is singular):
  equal up to rounding, several times faster at 2048-d, and free of the complex Schur form.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(
        f'statistics do not match: means {mu1.shape} and {mu2.shape}, '
        f'covariances {sigma1.shape} and {sigma2.shape}'
    )
  diff = mu1 - mu2
  if method == 'eigh':
    tr_covmean = _trace_sqrt_product(sigma1, sigma2)
  elif method == 'sqrtm':
    tr_covmean = _trace_sqrtm(sigma1, sigma2, eps)
  else:
    raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr (S1 S2)^(1/2) from the eigenvalues of a symmetric matrix similar to S1 S2."""
  # One BLAS thread: OpenBLAS' threaded eigensolvers slow down many-fold when the cores are
  # shared, while single-threaded 2048-d decompositions take about a second.
  with threadpoolctl.threadpool_limits(1, user_api='blas'):
    try:  # S1 = L L^T: L^T S2 L is similar to S2 S1
      root = np.linalg.cholesky(sigma1)
      product = root.T @ sigma2 @ root
    except np.linalg.LinAlgError:  # singular S1 (e.g. fewer samples than dimensions)
      # S1 = H H^T on its range; eigenvalues under 1e-10 tr(S1) are rounding noise, and asking
      # only for the others skips most of the eigenvector work
      cut = 1e-10 * max(float(np.trace(sigma1)), np.finfo(np.float64).tiny)
      from scipy import linalg  # imported where used: see _trace_sqrtm

      w, v = linalg.eigh(sigma1, subset_by_value=(cut, np.inf), driver='evr')
      half = v * np.sqrt(w)
      product = half.T @ sigma2 @ half
    ev = np.linalg.eigvalsh(product)
  return float(np.sqrt(np.clip(ev, 0, None)).sum())


def _trace_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  # imported where used: scipy.linalg costs 0.21 s at every start of the command lines, most of
  # which compute no Frechet distance
  from scipy import linalg

  with warnings.catch_warnings():
    warnings.simplefilter('ignore', linalg.LinAlgWarning)  # singular products: handled below
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
      warnings.warn(f'singular covariance product; adding {eps} to the diagonals', stacklevel=3)
      offset = np.eye(sigma1.shape[0]) * eps
      covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(
          f'sqrtm of the covariance product has an imaginary component of '
          f'{np.max(np.abs(covmean.imag)):.3g}'
      )
    covmean = covmean.real
  return float(np.trace(covmean))


def inception_score(logits, split_size: int = 5000) -> float:
  """ADM Inception Score of class logits [N, C]: mean over splits of exp(mean KL)."""
  logits = _features_2d(logits, 'logits').astype(np.float64)
  if split_size < 1:
    raise ValueError(f'split_size must be >= 1, got {split_size}')
  logp = logits - logits.max(axis=1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
  scores = []
  for start in range(0, len(logp), split_size):
    part = logp[start : start + split_size]
    p = np.exp(part)
    log_marginal = np.log(p.mean(axis=0, keepdims=True))
    kl = (p * (part - log_marginal)).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores))


@jax.jit
def _sq_dist(u: jax.Array, v: jax.Array) -> jax.Array:
  nu = jnp.sum(u * u, axis=1)[:, None]
  nv = jnp.sum(v * v, axis=1)[None, :]
  return jnp.maximum(nu - 2 * jnp.dot(u, v.T, precision=HIGHEST) + nv, 0.0)


@functools.partial(jax.jit, static_argnames='k')
def _kth_distance(rows: jax.Array, points: jax.Array, k: int) -> jax.Array:
  # the k+1 smallest include the row itself at distance ~0
  return -jax.lax.top_k(-_sq_dist(rows, points), k + 1)[0][:, k]


@jax.jit
def _inside_any(rows: jax.Array, centres: jax.Array, radii: jax.Array) -> jax.Array:
  return jnp.any(_sq_dist(rows, centres) <= radii[None, :], axis=1)


def _row_blocks(fn, rows: np.ndarray, block: int, *args) -> np.ndarray:
  """fn(row_block, *args) over fixed-size (zero-padded) row blocks, so it compiles once."""
  block = max(1, min(block, len(rows)))
  out = []
  for start in range(0, len(rows), block):
    chunk = rows[start : start + block]
    n = len(chunk)
    if n < block:
      chunk = np.concatenate([chunk, np.zeros((block - n,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(fn(chunk, *args))[:n])
  return np.concatenate(out)


def manifold_radii(features, k: int = 3, block: int = 1024) -> np.ndarray:
  """Squared distance of each feature vector to its k-th nearest neighbour in the set [N]."""
  features = _features_2d(features).astype(np.float32)
  if len(features) <= k:
    raise ValueError(
        f'k={k} nearest neighbours need more than {k} feature vectors, got {len(features)}'
    )
  points = jnp.asarray(features)
  return _row_blocks(lambda r: _kth_distance(r, points, k), features, block)


def precision_recall(reference, samples, k: int = 3, block: int = 1024) -> tuple[float, float]:
  """Improved precision and recall of samples [N, D] against reference features [M, D]."""
  ref = _features_2d(reference, 'reference features').astype(np.float32)
  smp = _features_2d(samples, 'sample features').astype(np.float32)
  if ref.shape[1] != smp.shape[1]:
    raise ValueError(f'feature sizes differ: reference {ref.shape[1]}, samples {smp.shape[1]}')
  ref_radii = jnp.asarray(manifold_radii(ref, k, block))
  smp_radii = jnp.asarray(manifold_radii(smp, k, block))
  ref_j, smp_j = jnp.asarray(ref), jnp.asarray(smp)
  precision = _row_blocks(lambda r: _inside_any(r, ref_j, ref_radii), smp, block).mean()
  recall = _row_blocks(lambda r: _inside_any(r, smp_j, smp_radii), ref, block).mean()
  return float(precision), float(recall)
