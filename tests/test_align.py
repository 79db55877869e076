"""Representation alignment: encoder features, the projector, the loss and its config."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from micro_config import random_mdt
from mdt_jax import MDTConfig, model_config
from mdt_jax.diffusion import create_diffusion, q_sample
from mdt_jax.diffusion.flow import FlowMatching
from mdt_jax.hub import official
from mdt_jax.models import dinov2, masking
from mdt_jax.models.mdt import MDT
from mdt_jax.models.params import InitKeys, flat_params
from mdt_jax.training import align

FIELDS = dict(depth=5, decode_layer=1, mask_ratio=0.3)  # 4 encoder blocks (2 in, 2 out)


def _inputs(b=2, seed=0):
  x = jax.random.normal(jax.random.key(seed), (b, 8, 8, 4))
  return x, jnp.array([5, 900])[:b], jnp.array([1, 7])[:b]


def test_features_are_the_encoder_blocks_outputs_and_leave_the_output_unchanged():
  model = random_mdt(**FIELDS)
  x, t, y = _inputs()
  n = model.config.num_tokens
  out = model(x, t, y)
  ordered = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (2, n))
  seen = []
  for block in range(1, model.config.encoder_depth + 1):
    got, plain = model(x, t, y, features_at=block)
    np.testing.assert_array_equal(got, out)
    assert plain.tokens.shape == (2, n, 32) and plain.ids is None and plain.valid is None
    # the masked pass keeping every token in grid order runs the same blocks on the same tokens
    _, full = model(x, t, y, ids_shuffle=ordered, len_keep=n, keep_buffer=n, features_at=block)
    np.testing.assert_allclose(full.tokens, plain.tokens, rtol=1e-5, atol=1e-5)
    seen.append(np.asarray(plain.tokens))
  assert all(not np.allclose(a, b) for a, b in zip(seen, seen[1:]))  # each block its own
  with pytest.raises(ValueError, match=r'features_at must be an encoder block in \[1, 4\], got 5'):
    model(x, t, y, features_at=5)


def test_masked_features_hold_the_kept_tokens_buffer():
  model = random_mdt(**FIELDS)
  x, t, y = _inputs()
  ids, keep = masking.draw_mask(jax.random.key(3), 2, model.config.num_tokens, 0.3)
  out, f = model(x, t, y, ids_shuffle=ids, len_keep=keep, features_at=2)
  np.testing.assert_array_equal(out, model(x, t, y, ids_shuffle=ids, len_keep=keep))
  k = masking.buffer_size(model.config.num_tokens, 0.3)
  assert f.tokens.shape == (2, k, 32)
  np.testing.assert_array_equal(f.ids, ids[:, :k])
  np.testing.assert_array_equal(f.valid, jnp.broadcast_to(jnp.arange(k) < keep, (2, k)))


def test_cosine_terms():
  s = jax.random.normal(jax.random.key(0), (2, 6, 5))
  same = align.cosine_terms(s, 3.0 * s)
  np.testing.assert_allclose([same['loss'], same['cos']], [-1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(align.cosine_terms(s, -s)['loss'], 1.0, rtol=1e-6)
  t = jax.random.normal(jax.random.key(1), (2, 6, 5))
  want = np.mean(
      np.sum(np.asarray(s) * np.asarray(t), -1)
      / np.linalg.norm(np.asarray(s), axis=-1)
      / np.linalg.norm(np.asarray(t), axis=-1)
  )
  np.testing.assert_allclose(align.cosine_terms(s, t)['cos'], want, rtol=1e-5)
  # invalid slots are not counted, whatever they hold
  valid = jnp.arange(6)[None] < jnp.array([[4], [2]])
  garbage = jnp.where(valid[..., None], t, 1e6 * jax.random.normal(jax.random.key(2), t.shape))
  masked = align.cosine_terms(s, garbage, valid)
  cos = np.asarray(jnp.sum(s * t, -1) / jnp.linalg.norm(s, axis=-1) / jnp.linalg.norm(t, axis=-1))
  np.testing.assert_allclose(masked['cos'], cos[np.asarray(valid)].mean(), rtol=1e-5)


def test_masked_branch_matches_teacher_tokens_at_the_same_positions():
  teacher = jax.random.normal(jax.random.key(0), (2, 16, 3))
  ids = jnp.array([[5, 2, 9, 0], [15, 14, 1, 3]])
  valid = jnp.array([[True, True, True, False]] * 2)
  student = jnp.take_along_axis(teacher, ids[:, :, None], axis=1)
  features = align.Features(student, ids, valid)
  np.testing.assert_array_equal(align.at_positions(features, teacher), student)
  np.testing.assert_allclose(
      align.cosine_terms(student, align.at_positions(features, teacher), valid)['cos'],
      1.0,
      rtol=1e-6,
  )
  shifted = align.Features(student, (ids + 1) % 16, valid)
  assert align.cosine_terms(student, align.at_positions(shifted, teacher), valid)['cos'] < 0.9


def _tiny_config(**fields):
  base = dict(input_size=8, hidden_size=32, num_heads=2, num_classes=10, **FIELDS)
  return MDTConfig.from_dict(model_config('S/2', **{**base, **fields}).to_dict())


def test_projector_is_drawn_last_and_off_adds_nothing():
  off = flat_params(nnx.state(MDT(_tiny_config(), rngs=InitKeys(0)), nnx.Param))
  on = flat_params(
      nnx.state(MDT(_tiny_config(align_dim=12, projector_dim=24), rngs=InitKeys(0)), nnx.Param)
  )
  extra = sorted(set(on) - set(off))
  assert extra == [f'projector.fc{i}.{w}' for i in (1, 2, 3) for w in ('bias', 'kernel')]
  assert on['projector.fc1.kernel'].shape == (32, 24) and on['projector.fc3.kernel'].shape == (
      24,
      12,
  )
  for k in off:  # the same seed gives the model the same weights
    np.testing.assert_array_equal(on[k], off[k])
  # the official layout has no projector (exports drop it)
  assert set(official.layout(_tiny_config(align_dim=12))) == set(official.layout(_tiny_config()))


def test_align_loss_trains_the_projector_and_the_blocks_up_to_depth_only():
  model = random_mdt(**FIELDS, align_dim=6, projector_dim=16)
  graphdef, params = nnx.split(model, nnx.Param)
  x, t, y = _inputs()
  teacher = jax.random.normal(jax.random.key(5), (2, 16, 6))

  def loss(params):
    m = nnx.merge(graphdef, params)
    _, f = m(x, t, y, features_at=1)
    return align.align_terms(m, f, teacher)['loss']

  grads = flat_params(jax.grad(loss)(params))
  moved = {k for k, g in grads.items() if np.any(g != 0)}
  assert {
      'projector.fc1.kernel',
      'en_inblocks.0.attn.qkv.kernel',
      'x_embedder.proj.kernel',
  } <= moved
  assert not any(k.startswith(('en_outblocks', 'de_blocks', 'final_layer')) for k in moved)


def test_align_config_refusals(tmp_path):
  cfg = _tiny_config()  # encoder depth 4
  with pytest.raises(ValueError, match=r"align.method must be one of \('none', 'repa', 'sra'\)"):
    align.AlignConfig(method='repo')
  with pytest.raises(ValueError, match="unknown align config keys \\['deep'\\]"):
    align.AlignConfig.from_dict({'deep': 3})
  with pytest.raises(ValueError, match='align.branches must be one of'):
    align.AlignConfig(branches='all')
  shallow = _tiny_config(depth=2, decode_layer=1)  # MDTv2: no encoder block
  with pytest.raises(ValueError, match='leaves the encoder no blocks'):
    align.AlignConfig(method='sra').check(shallow, mask_branch=True)
  with pytest.raises(ValueError, match=r'align.depth=5 exceeds the encoder depth 4'):
    align.AlignConfig(method='sra', depth=5).check(cfg, mask_branch=True)
  with pytest.raises(ValueError, match='SRA teacher block must be deeper than the student block 3'):
    align.AlignConfig(method='sra', depth=3, teacher_depth=2).check(cfg, mask_branch=True)
  with pytest.raises(ValueError, match='aligns the masked branch, but mask_branch=False'):
    align.AlignConfig(method='sra', branches='both').check(cfg, mask_branch=False)
  with pytest.raises(ValueError, match='needs align.teacher'):
    align.AlignConfig(method='repa').check(cfg, mask_branch=True)
  with pytest.raises(FileNotFoundError, match="align.teacher='.*nowhere' does not exist"):
    align.AlignConfig(method='repa', teacher=str(tmp_path / 'nowhere')).check(cfg, mask_branch=True)
  with pytest.raises(FileNotFoundError, match='is not a DINOv2 folder'):
    align.AlignConfig(method='repa', teacher=str(tmp_path)).check(cfg, mask_branch=True)
  # 'none' checks nothing and changes nothing
  none = align.AlignConfig(depth=99)
  none.check(cfg, mask_branch=False)
  assert none.model_config(cfg) is cfg
  # the defaults: REPA's block 8 of 28 scaled (5 blocks -> 1), the SRA teacher twice as deep
  sra = align.AlignConfig(method='sra')
  assert (sra.student_block(cfg), sra.teacher_block(cfg)) == (1, 2)
  assert sra.model_config(cfg).align_dim == 32
  xl = MDTConfig.from_dict(model_config('XL/2').to_dict())
  assert (sra.student_block(xl), sra.teacher_block(xl)) == (8, 16)


def test_repa_targets_from_a_dinov2_folder(tmp_path):
  config = dinov2.Dinov2Config(
      hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=4
  )
  model = dinov2.Dinov2(config, rngs=nnx.Rngs(0))
  params = {
      k: np.asarray(v[...])
      for k, v in ((dinov2.param_name(p), v) for p, v in nnx.to_flat_state(nnx.state(model)))
  }
  folder = dinov2.save(str(tmp_path / 'teacher'), config, params)
  choice = align.AlignConfig(method='repa', teacher=folder, resolution=32)
  choice.check(_tiny_config(), mask_branch=True)
  assert choice.model_config(_tiny_config()).align_dim == 16
  grey = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1), minval=-1, maxval=1)
  got = align.repa_targets(dinov2.load(folder), grey, grid=4, resolution=32)
  rgb = dinov2.normalize(jnp.repeat(grey, 3, -1), 32)
  want = dinov2.pool_tokens(model.patch_tokens(rgb), 4)  # 8x8 teacher grid onto 4x4
  assert got.shape == (2, 16, 16)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_sra_time_is_lower_noise_within_the_offset():
  key = jax.random.key(0)
  process = create_diffusion()
  t = jnp.arange(0, 1000, 7)
  tt = align.sra_time(process, t, key, 0.2)
  assert tt.dtype == t.dtype and np.all(tt <= t) and np.all(tt >= 0)
  assert np.all(t - tt <= 200) and np.any(t - tt > 100)
  ft = jnp.linspace(0.0, 1.0, 50)
  ftt = align.sra_time(FlowMatching(), ft, key, 0.2)
  assert np.all(ftt <= ft) and np.all(ftt >= 0) and np.all(ft - ftt <= 0.2 + 1e-6)
  assert np.all(align.sra_time(process, t, key, 0.0) == t)


def test_sra_targets_are_the_teacher_block_at_the_teacher_time():
  model = random_mdt(**FIELDS)
  process = create_diffusion()
  x0, t, y = _inputs()
  noise = jax.random.normal(jax.random.key(9), x0.shape)
  key = jax.random.key(4)
  got = align.sra_targets(model, process, x0, noise, t - 3, y, key, 3)

  _, f = model(q_sample(process, x0, t - 3, noise), t - 3, y, rng=key, train=True, features_at=3)
  np.testing.assert_array_equal(got, f.tokens)


def test_active_weight_stops_at_stop_step():
  a = align.AlignConfig(method='sra', weight=0.5, stop_step=10)
  assert float(align.active_weight(a, jnp.int32(9))) == 0.5
  assert float(align.active_weight(a, jnp.int32(10))) == 0.0
  never = dataclasses.replace(a, stop_step=0)
  assert float(align.active_weight(never, jnp.int32(10**6))) == 0.5
