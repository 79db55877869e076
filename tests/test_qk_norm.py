"""QK-norm (model.qk_norm): RMS or layer norm of each head's queries and keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from micro_config import random_mdt
from mdt_jax import MDTConfig, model_config
from mdt_jax.hub import official
from mdt_jax.hub.folder import load_model_folder, save_model_folder
from mdt_jax.models import attention
from mdt_jax.models.params import abstract_model, param_name

HEADS, DH = 2, 8


def _qkv(scale=1.0, seed=0):
  return scale * jax.random.normal(jax.random.key(seed), (2, 5, 3 * HEADS * DH))


def _heads(qkv):
  return np.asarray(qkv, np.float64).reshape(2, 5, 3, HEADS, DH)


@pytest.mark.parametrize('kind', ['rms', 'layer'])
def test_qk_norm_normalises_queries_and_keys_per_head_and_keeps_values(kind):
  norm = attention.QKNorm(kind, HEADS, DH)
  norm.q_scale[...] = jnp.arange(1.0, DH + 1)
  qkv = _qkv()
  out, x = _heads(norm(qkv)), _heads(qkv)
  q = x[:, :, 0]
  if kind == 'layer':
    q = q - q.mean(-1, keepdims=True)
  want_q = q / np.sqrt(np.square(q).mean(-1, keepdims=True) + 1e-6) * np.arange(1, DH + 1)
  np.testing.assert_allclose(out[:, :, 0], want_q, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[:, :, 2], x[:, :, 2])  # values untouched
  if kind == 'layer':
    np.testing.assert_allclose(out[:, :, 1].mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.sqrt(np.square(out[:, :, 1]).mean(-1)), 1.0, rtol=1e-4)


@pytest.mark.parametrize('kind', ['rms', 'layer'])
def test_qk_norm_bounds_the_attention_logits(kind):
  """With unit scales |q.k| / sqrt(dh) <= sqrt(dh) however large the projections grow."""
  qkv = _qkv(scale=1000.0, seed=1)

  def max_logit(qkv):
    x = _heads(qkv)
    return np.abs(np.einsum('bqhd,bkhd->bhqk', x[:, :, 0], x[:, :, 1])).max() / np.sqrt(DH)

  assert max_logit(qkv) > 1e5  # unnormalised, the logits grow with the projections
  assert max_logit(attention.QKNorm(kind, HEADS, DH)(qkv)) <= np.sqrt(DH) * (1 + 1e-5)


def test_unknown_qk_norm_is_refused():
  with pytest.raises(ValueError, match=r"qk_norm must be one of .*'l2'"):
    MDTConfig(qk_norm='l2')
  assert MDTConfig().qk_norm is None and model_config('S/2')['qk_norm'] is None  # off


def _tiny(**fields):
  tiny = dict(input_size=8, hidden_size=32, depth=3, decode_layer=1, num_heads=2, num_classes=10)
  return MDTConfig.from_dict(model_config('S/2', **{**tiny, **fields}).to_dict())


def _shapes(config):
  return {param_name(p): v.shape for p, v in nnx.to_flat_state(nnx.state(abstract_model(config)))}


def test_qk_norm_adds_two_scales_per_attention_and_off_adds_none():
  off, rms = _shapes(_tiny()), _shapes(_tiny(qk_norm='rms'))
  added = sorted(set(rms) - set(off))
  attentions = sorted(k[: -len('.qkv.kernel')] for k in off if k.endswith('attn.qkv.kernel'))
  assert set(off) <= set(rms)
  assert added == sorted(f'{a}.qk_norm.{w}' for a in attentions for w in ('k_scale', 'q_scale'))
  assert all(rms[k] == (32 // 2,) for k in added)


def test_qk_norm_model_runs_both_branches_and_its_folder_records_it(tmp_path):
  model = random_mdt(qk_norm='layer', mask_ratio=0.3)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  t, y = jnp.array([3, 700]), jnp.array([1, 2])
  plain = model(x, t, y)
  masked = model(x, t, y, rng=jax.random.key(1), enable_mask=True)
  assert plain.shape == masked.shape == (2, 8, 8, 8)
  assert np.all(np.isfinite(np.asarray(masked)))
  save_model_folder(str(tmp_path / 'm'), nnx.state(model, nnx.Param), model.config)
  loaded = load_model_folder(str(tmp_path / 'm'))
  assert loaded.config.qk_norm == 'layer' and loaded.meta['model']['qk_norm'] == 'layer'
  np.testing.assert_array_equal(loaded.model(x, t, y), plain)


def test_official_layout_refuses_qk_norm():
  with pytest.raises(ValueError, match="qk_norm='rms': the official checkpoint layout has no"):
    official.layout(_tiny(qk_norm='rms'))
  assert (
      official.infer_config(
          {k: np.zeros(e.shape) for k, e in official.layout(_tiny()).items()}
      ).qk_norm
      is None
  )
