"""MDTv2 model: sizes, embeddings, initialisation, masking, parity with the NumPy reference."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference_mdt as ref
from mdt_jax import MDT, MDTConfig, count_params, model_config
from mdt_jax.hub import official
from mdt_jax.models import attention, masking, platform
from mdt_jax.models.layers import relative_position_index, sincos_2d
from mdt_jax.models.params import InitKeys

TINY = dict(
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=32,
    depth=6,
    num_heads=4,
    decode_layer=2,
    num_classes=10,
)


# A bfloat16 forward of the tiny model vs the float64 reference, largest error / largest output:
# 0.55-0.94% seen over seeds and both residual streams (bfloat16 keeps 8 significant bits, ~0.4%
# per rounding); the float32 path is within 2e-6, so the lower bound shows bfloat16 was used.
BF16_ERR = (1e-3, 2e-2)


def tiny(**kw):
  return model_config('S/2', **{**TINY, **kw}).to_dict()


@pytest.mark.parametrize(
    'name,decode_layer,expected',
    [
        ('S/2', 6, 38_454_872),
        ('B/2', 4, 150_931_856),
        ('L/2', 4, 507_015_776),
        ('XL/2', 4, 742_263_904),
        ('XL/2', 2, 739_608_544),
        ('S/2', 4, 38_159_576),
    ],
)
def test_official_parameter_counts(name, decode_layer, expected):
  assert count_params(model_config(name, decode_layer=decode_layer).to_dict()) == expected


def test_v1_parameter_count():
  cfg = model_config('XL/2', decode_layer=2, arch='mdt_v1').to_dict()
  assert count_params(cfg) == 699_778_144


@pytest.mark.parametrize('name', ['S/4', 'B/8', 'XL/4'])
def test_patch_variants_build(name):
  cfg = MDTConfig.from_dict(model_config(name).to_dict())
  assert cfg.num_tokens == (32 // cfg.patch_size) ** 2
  assert count_params(cfg) > 0


def test_sincos_and_relative_index_match_loop_definitions():
  np.testing.assert_allclose(sincos_2d(16, 3), ref.sincos_check(16, 3), atol=1e-6)
  np.testing.assert_array_equal(relative_position_index(4), ref.rel_index(4))
  assert relative_position_index(16).max() == (2 * 16 - 1) ** 2 - 1


def test_init_follows_the_spec():
  m = MDT(tiny(mask_ratio=0.3), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  out = m(x, jnp.array([3, 700]), jnp.array([1, 10]))
  assert out.shape == (2, 8, 8, 8) and out.dtype == jnp.float32
  assert float(jnp.abs(out).max()) == 0.0  # adaLN-Zero + zero final layer
  np.testing.assert_allclose(m.pos_embed[...][0], sincos_2d(32, 4), atol=1e-7)
  np.testing.assert_allclose(m.decoder_pos_embed[...][0], sincos_2d(32, 4), atol=1e-7)
  assert float(jnp.std(m.mask_token[...])) > 0.005
  for blk in [*m.en_inblocks, *m.en_outblocks, *m.de_blocks, *m.sideblocks]:
    assert float(jnp.abs(blk.adaLN_modulation_1.kernel[...]).max()) == 0.0
    assert float(jnp.abs(blk.attn.qkv.kernel[...]).max()) > 0.0
  limit = math.sqrt(6 / (32 + 96))
  assert float(jnp.abs(m.en_inblocks[0].attn.qkv.kernel[...]).max()) <= limit
  assert m.y_embedder.embedding_table.embedding.shape == (11, 32)  # null class row
  no_mask = MDT(tiny(mask_ratio=None), rngs=nnx.Rngs(0))
  assert float(jnp.abs(no_mask.mask_token[...]).max()) == 0.0


def test_init_keys_draw_the_keys_of_nnx_rngs():
  """InitKeys (the key stream of the jitted initialiser and of abstract models) draws the keys of
  nnx.Rngs's 'params' stream, from an int seed and from a typed key, so a model built with either
  has the same weights (checked on a tiny model); the model's constructors draw nothing else
  (they run with InitKeys in every training test)."""
  for seed in (3, jax.random.key(5)):
    want, got = nnx.Rngs(seed), InitKeys(seed)
    keys = [(got.params(), want.params()) for _ in range(12)]
    for a, b in keys:
      np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
    assert len({jax.random.key_data(a).tobytes() for a, _ in keys}) == 12  # a stream, not one key
  # the weights themselves, bit for bit
  cfg = tiny(mask_ratio=0.3)
  a, b = (nnx.to_pure_dict(nnx.state(MDT(cfg, rngs=keys(0)))) for keys in (nnx.Rngs, InitKeys))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert sum(bool(np.any(np.asarray(x))) for x in jax.tree.leaves(a)) > 20  # drawn, not zero
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match='typed key, got dtype uint32'):
    InitKeys(jax.random.key_data(jax.random.key(0)))


FakeDevice = dataclasses.make_dataclass('FakeDevice', [('platform', str), ('device_kind', str)])


def test_tpus_with_small_vmem_get_xla_attention():
  """Traced for a TPU, automatic attention is the Pallas kernel, except on TPU v2-v4, whose 16 MiB
  of VMEM cannot hold the kernel's blocks at XL/2's size: XLA's attention there."""
  qkv, bias = jnp.zeros((2, 16, 3 * 8)), jnp.zeros((2, 16, 16))

  def traced(kind):
    fn = lambda q, b: attention.attend(q, b, None, 2)
    return str(jax.make_jaxpr(platform.traced_for([FakeDevice('tpu', kind)] * 4, fn))(qkv, bias))

  for kind in ('TPU v5', 'TPU v5 lite', 'TPU v6 lite'):
    assert 'pallas_call' in traced(kind), kind
  for kind in ('TPU v4', 'TPU v3'):
    assert 'pallas_call' not in traced(kind) and 'dot_general' in traced(kind), kind
  with platform.assume_backend('tpu', 'TPU v4'):
    assert platform.device_kind() == 'TPU v4'
  assert platform.device_kind() is None  # the CPU's devices: no TPU kind


@pytest.mark.every_backend
def test_traced_for_traces_the_platform_of_its_devices_only():
  """by_backend under jit traces every platform's branch; traced_for(devices, fn) only the
  branch of their platform (GPUs take the default), and computes the same."""
  f = lambda x: platform.by_backend(
      x, cpu=lambda a: a + 1, tpu=lambda a: a + 2, default=lambda a: a * 3
  )
  cpus = jax.devices('cpu')
  assert jax.jit(f)(1.0) == 2.0 and jax.jit(platform.traced_for(cpus, f))(1.0) == 2.0
  assert 'cond' in str(jax.make_jaxpr(f)(1.0))
  jaxpr = str(jax.make_jaxpr(platform.traced_for(cpus, f))(1.0))
  assert 'cond' not in jaxpr and 'add' in jaxpr and 'mul' not in jaxpr
  fake = lambda name: FakeDevice(name, 'TPU v5' if name == 'tpu' else name)
  assert platform.backend_of([fake('tpu')] * 4) == 'tpu'
  assert platform.backend_of([fake('gpu')]) == 'default'
  assert platform.backend_of([fake('gpu'), fake('cpu')]) is None
  assert platform.traced_for([fake('gpu'), fake('cpu')], f) is f


def test_assume_backend_none_traces_every_branch_again():
  # a new function at each trace: jax caches traces by function, not by this context
  jaxpr = lambda: str(
      jax.make_jaxpr(
          lambda x: platform.by_backend(x, tpu=lambda a: a + 2, default=lambda a: a * 3)
      )(1.0)
  )
  with platform.assume_backend('tpu', 'TPU v5'):
    assert 'cond' not in jaxpr() and platform.device_kind() == 'TPU v5'
    with platform.assume_backend(None):
      assert 'cond' in jaxpr() and platform.device_kind() is None
    assert 'mul' not in jaxpr()  # the enclosing assumption again
  with pytest.raises(ValueError, match="backend 'gpu'"):
    with platform.assume_backend('gpu'):
      pass


def _load_random(cfg, seed=0):
  cfg = MDTConfig.from_dict(cfg)
  sd = ref.random_state_dict(official.layout(cfg), official.index_buffers(cfg), cfg.grid, seed)
  return sd, official.model_from_state(sd, cfg)


def _inputs(b=3, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, 8, 8, 4)).astype(np.float32)
  return x, np.array([0, 499, 999][:b]), np.array([1, 10, 7][:b])


@pytest.mark.parametrize('arch', ['mdtv2', 'mdt_v1'])
def test_plain_pass_matches_numpy_reference(arch):
  cfg = tiny(arch=arch)
  sd, model = _load_random(cfg)
  x, t, y = _inputs()
  got = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
  want = ref.forward(sd, x.transpose(0, 3, 1, 2), t, y, heads=4, decode_layer=2, arch=arch)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('arch,multiple', [('mdtv2', 1), ('mdt_v1', 1), ('mdtv2', 8)])
def test_static_buffer_masked_pass_equals_exact_kept_tokens(arch, multiple):
  cfg = tiny(arch=arch, mask_ratio=0.3, mask_buffer_multiple=multiple)
  sd, model = _load_random(cfg, seed=3)
  x, t, y = _inputs()
  rng = np.random.default_rng(5)
  ids = np.stack([rng.permutation(16) for _ in range(3)]).astype(np.int32)
  kmax = masking.max_kept(16, 0.3)
  assert kmax == 11 and masking.buffer_size(16, 0.3, multiple) == (11 if multiple == 1 else 16)
  fn = jax.jit(lambda x, t, y, ids, k: model(x, t, y, ids_shuffle=ids, len_keep=k))
  for k in (kmax, 9, 7, 1):
    got = fn(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), jnp.asarray(ids), k)
    want = ref.forward(
        sd,
        x.transpose(0, 3, 1, 2),
        t,
        y,
        heads=4,
        decode_layer=2,
        arch=arch,
        ids_shuffle=ids,
        len_keep=k,
    )
    np.testing.assert_allclose(
        np.asarray(got).transpose(0, 3, 1, 2), want, atol=2e-5, rtol=1e-4, err_msg=f'len_keep={k}'
    )
  assert fn._cache_size() == 1  # one compilation for every kept count


def test_masked_pass_differs_from_plain_and_keeps_unmasked_path():
  cfg = tiny(mask_ratio=0.3)
  _, model = _load_random(cfg, seed=2)
  x, t, y = _inputs()
  ids = jnp.tile(jnp.arange(16, dtype=jnp.int32), (3, 1))
  plain = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
  masked = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), ids_shuffle=ids, len_keep=8)
  assert float(jnp.abs(plain - masked).mean()) > 1e-3


def test_mask_draw_follows_official_distribution():
  n, ratio = 256, 0.3
  draw = jax.jit(jax.vmap(lambda k: masking.draw_mask(k, 2, n, ratio)))
  ids, keep = draw(jax.random.split(jax.random.key(0), 4000))
  keep = np.asarray(keep)
  # r ~ U[0.3, 0.5): floor(256 * (1 - r)) in {128, ..., 179}
  assert keep.min() >= 128 and keep.max() <= 179
  assert keep.min() <= 129 and keep.max() >= 178
  # the kept count is floor(L(1-r)) of a uniform r: each value's frequency ~ its r-interval
  r = np.random.default_rng(0).uniform(0.3, 0.5, 400_000)
  expected = np.bincount(np.floor(n * (1 - r)).astype(int), minlength=180)[128:] / r.size
  observed = np.bincount(keep, minlength=180)[128:] / keep.size
  assert np.abs(observed - expected).max() < 0.01
  assert abs(keep.mean() - (n * (1 - r)).mean() + 0.5) < 0.5
  ids = np.asarray(ids)
  assert (np.sort(ids, axis=-1) == np.arange(n)).all()  # permutations
  assert (ids[:, 0] != ids[:, 1]).any(axis=-1).mean() > 0.99  # per-sample orders
  assert masking.max_kept(256, 0.3) == 179


def test_drawn_masks_compile_once_over_many_steps():
  cfg = tiny(mask_ratio=0.3)
  _, model = _load_random(cfg)
  graphdef, state = nnx.split(model)
  x, t, y = (jnp.asarray(a) for a in _inputs())

  @jax.jit
  def fn(state, k):
    return nnx.merge(graphdef, state)(x, t, y, rng=k, train=True, enable_mask=True)

  lens = set()
  for i in range(30):
    k = jax.random.key(i)
    fn(state, k)
    lens.add(int(masking.draw_mask(jax.random.split(k)[1], 3, 16, 0.3)[1]))
  assert len(lens) > 1  # the kept count did vary ...
  assert fn._cache_size() == 1  # ... and the step compiled once


def test_label_dropout_uses_null_class_at_the_configured_rate():
  m = MDT(tiny(class_dropout_prob=0.1), rngs=nnx.Rngs(0))  # the official rate
  n = 20_000
  y = jnp.arange(n) % 10
  emb = m.y_embedder(y, jax.random.key(0))
  table = m.y_embedder.embedding_table.embedding[...]
  dropped = np.asarray(jnp.all(emb == table[10], axis=-1))
  kept = np.asarray(jnp.all(emb == table[y], axis=-1))
  assert (dropped ^ kept).all()  # each label: its own row or the null row
  # Binomial(20000, 0.1): 2000 +- 42 (one sd); 5 sd either side
  assert abs(int(dropped.sum()) - 0.1 * n) < 5 * np.sqrt(n * 0.1 * 0.9), int(dropped.sum())
  assert bool(jnp.all(m.y_embedder(y) == table[y]))  # no drop without a key


def test_bfloat16_compute_keeps_float32_params():
  cfg = tiny(dtype='bfloat16')
  sd, model = _load_random(cfg)
  params = nnx.state(model, nnx.Param)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
  x, t, y = _inputs()
  out = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
  want = ref.forward(sd, x.transpose(0, 3, 1, 2), t, y, heads=4, decode_layer=2)
  assert out.dtype == jnp.float32
  err = np.abs(np.asarray(out).transpose(0, 3, 1, 2) - want).max() / np.abs(want).max()
  assert BF16_ERR[0] < err < BF16_ERR[1], err


@pytest.mark.parametrize('residual, stream', [('float32', jnp.float32), ('compute', jnp.bfloat16)])
def test_bfloat16_residual_stream_dtype_is_one_choice(residual, stream):
  from mdt_jax.models.layers import MDTBlock

  cfg = MDTConfig.from_dict(tiny(dtype='bfloat16', residual_dtype=residual))
  assert cfg.stream_dtype == stream
  blk = MDTBlock(
      32, 4, 4.0, 4, skip=True, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, stream_dtype=cfg.stream_dtype
  )
  c = jnp.ones((2, 32), jnp.float32)
  for x_dtype in (jnp.float32, jnp.bfloat16):  # whatever comes in (after a skip fusion too)
    x = jnp.ones((2, 16, 32), x_dtype)
    assert blk(x, c, None, skip=x).dtype == stream
  # The whole model: the choice moves a bfloat16 forward by rounding only
  x, t, y = (jnp.asarray(a) for a in _inputs())
  sd, model = _load_random(cfg.to_dict())
  want = ref.forward(
      sd, np.asarray(x).transpose(0, 3, 1, 2), np.asarray(t), np.asarray(y), heads=4, decode_layer=2
  )
  out = np.asarray(model(x, t, y)).transpose(0, 3, 1, 2)
  err = np.abs(out - want).max() / np.abs(want).max()
  assert BF16_ERR[0] < err < BF16_ERR[1], err


def test_residual_dtype_is_a_no_op_in_float32():
  x, t, y = (jnp.asarray(a) for a in _inputs())
  _, m1 = _load_random(tiny(mask_ratio=0.3))
  _, m2 = _load_random(tiny(mask_ratio=0.3, residual_dtype='compute'))
  np.testing.assert_array_equal(np.asarray(m1(x, t, y)), np.asarray(m2(x, t, y)))


def test_one_hot_relative_position_bias_is_the_gather():
  """The bias built by one-hot contractions (the TPU's) is the table's gather: the same values in
  float32 and bfloat16 (one nonzero term per sum), and in float32 the masked pass's output and
  gradients (the encoder with the kept tokens' per-sample bias, the side block and decoder with
  the full one) are the gather's."""
  from mdt_jax.models.layers import RelativePositionBias

  rpb = RelativePositionBias(5, 3, rngs=nnx.Rngs(2))
  ids = jax.random.permutation(
      jax.random.key(0), jnp.tile(jnp.arange(25), (2, 1)), axis=1, independent=True
  )[:, :7]

  @jax.jit  # one compile for all of them; None: chosen by backend (all branches traced)
  def biases(ids):
    return [
        [rpb(sel, impl, dt) for impl in ('gather', 'onehot', None)]
        for sel, dt in ((None, jnp.float32), (ids, jnp.float32), (ids, jnp.bfloat16))
    ]

  for (want, onehot, auto), shape, dt in zip(
      biases(ids),
      ((3, 25, 25), (2, 3, 7, 7), (2, 3, 7, 7)),
      (jnp.float32, jnp.float32, jnp.bfloat16),
  ):
    assert want.shape == shape and want.dtype == onehot.dtype == auto.dtype == dt
    np.testing.assert_array_equal(onehot, want)
  with pytest.raises(ValueError, match="impl 'take': expected one of"):
    rpb(ids, 'take')
  with pytest.raises(ValueError, match="rel_pos_bias_impl must be one of .* got 'take'"):
    MDTConfig(rel_pos_bias_impl='take')

  x, t, y = (jnp.asarray(a) for a in _inputs())
  cfg = tiny(mask_ratio=0.3, depth=2, decode_layer=1)
  sd, _ = _load_random(cfg, seed=3)
  results = []
  for impl in ('gather', 'onehot'):
    model = official.model_from_state(sd, MDTConfig.from_dict({**cfg, 'rel_pos_bias_impl': impl}))
    graphdef, params = nnx.split(model)

    def loss(params):
      out = nnx.merge(graphdef, params)(x, t, y, rng=jax.random.key(1), enable_mask=True)
      return jnp.mean(jnp.sin(out) * out), out

    results.append(jax.jit(jax.grad(loss, has_aux=True))(params))
  (g1, out1), (g2, out2) = results
  assert float(jnp.abs(out1).max()) > 0.5
  np.testing.assert_allclose(out2, out1, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_remat_gives_same_output_and_gradient():
  # one block of each kind (masked encoder, side block, decoder); jitted: eager op-by-op
  # dispatch of the backward pass took most of a minute
  cfg = tiny(mask_ratio=0.3, depth=3, decode_layer=1)
  _, m1 = _load_random(cfg)
  _, m2 = _load_random({**cfg, 'remat': True})
  x, t, y = _inputs()
  loss = lambda m: jnp.mean(m(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)) ** 2)
  g1 = nnx.jit(nnx.grad(loss))(m1)
  g2 = nnx.jit(nnx.grad(loss))(m2)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g1)) > 1e-4
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    'bad,match',
    [
        (dict(x=np.zeros((2, 8, 8, 3), np.float32)), r'x must be NHWC \[B, 8, 8, 4\]'),
        (dict(x=np.zeros((2, 4, 8, 8), np.float32)), r'x must be NHWC'),
        (dict(t=np.zeros((3,), np.int32)), r't must have shape \[B\]=\(2,\)'),
        (dict(y=np.zeros((2,), np.float32)), r'y must hold integer class ids'),
    ],
)
def test_bad_inputs_are_named(bad, match):
  m = MDT(tiny(), rngs=nnx.Rngs(0))
  args = dict(
      x=np.zeros((2, 8, 8, 4), np.float32), t=np.zeros((2,), np.int32), y=np.zeros((2,), np.int32)
  )
  args.update(bad)
  with pytest.raises((ValueError, TypeError), match=match):
    jax.jit(lambda x, t, y: m(x, t, y))(**{k: jnp.asarray(v) for k, v in args.items()})


# A non-default value of every compute and training field (their role in MDTConfig).
OTHER_VALUES = dict(
    dtype='bfloat16',
    remat=True,
    remat_policy='dots_saveable',
    attention_impl='xla',
    masked_attention_impl='xla',
    mask_buffer_multiple=8,
    residual_dtype='compute',
    rel_pos_bias_impl='onehot',
    class_dropout_prob=0.2,
    mask_ratio=0.4,
    mask_ratio_span=0.1,
)


def test_field_roles_say_which_fields_keep_the_parameters():
  """What resume, export and parity rely on: a compute or training field changes no parameter
  (class_dropout_prob 0 <-> > 0 does, and check_workdir compares shapes for it); the presets
  and COMPUTE_OPTIONS come from MDTConfig's own fields and defaults."""
  from mdt_jax.models.mdt import COMPUTE, COMPUTE_OPTIONS, TRAINING, field_names
  from mdt_jax.models.params import param_shapes

  assert set(OTHER_VALUES) == set(field_names(COMPUTE, TRAINING))
  base = MDTConfig.from_dict(tiny(depth=2, decode_layer=0))
  assert all(v != getattr(base, k) for k, v in OTHER_VALUES.items())
  shapes = param_shapes(base)
  assert param_shapes(dataclasses.replace(base, **OTHER_VALUES)) == shapes
  assert param_shapes(dataclasses.replace(base, hidden_size=16)) != shapes  # a shape field
  assert COMPUTE_OPTIONS == {k: getattr(MDTConfig(), k) for k in field_names(COMPUTE)}
  assert set(model_config('B/4')) == {f.name for f in dataclasses.fields(MDTConfig)}


def test_unknown_and_invalid_config_values_are_refused():
  with pytest.raises(ValueError, match=r"unknown model config keys \['hiden_size'\]"):
    MDTConfig.from_dict({'hiden_size': 3})
  with pytest.raises(ValueError, match='not divisible by patch_size'):
    MDTConfig(input_size=30, patch_size=4)
  with pytest.raises(ValueError, match='unknown model size'):
    model_config('XXL/2')
  with pytest.raises(
      ValueError,
      match=r"residual_dtype must be one of \('float32', 'compute'\), got 'bfloat16'",
  ):
    MDTConfig(residual_dtype='bfloat16')


def test_cudnn_attention_needs_even_lengths_and_says_how_to_pad():
  xl = dict(mask_ratio=0.3, attention_impl='cudnn')  # XL/2 sizes: 256 tokens, keep 179
  with pytest.raises(ValueError, match=r"masked encoder buffer': 179.*mask_buffer_multiple=8"):
    MDTConfig(**xl)
  assert masking.buffer_size(256, 0.3, 8) == 184
  MDTConfig(**xl, mask_buffer_multiple=8)  # 184: accepted
  MDTConfig(**xl, mask_buffer_multiple=2)  # 180: accepted
  MDTConfig(mask_ratio=0.3)  # odd buffer is fine for XLA
  with pytest.raises(ValueError, match="'tokens': 225"):  # 15 x 15 grid
    MDTConfig(input_size=30, attention_impl='cudnn')
  with pytest.raises(ValueError, match="attention_impl must be one of .* got 'flash'"):
    MDTConfig(attention_impl='flash')
  with pytest.raises(ValueError, match=r"attention_impl must be one of .*\(None = auto\), got ''"):
    MDTConfig(attention_impl='')  # unset is None ('' of older config.json files: upgrade)
  # cuDNN for the full-length passes only: the masked buffer may stay odd
  assert MDTConfig(**xl, masked_attention_impl='xla').masked_impl == 'xla'
  with pytest.raises(
      ValueError, match=r"got \{'masked encoder buffer': 179\}.*masked_attention_impl=xla"
  ):
    MDTConfig(mask_ratio=0.3, masked_attention_impl='cudnn')
  with pytest.raises(ValueError, match="masked_attention_impl must be .* got 'flash'"):
    MDTConfig(masked_attention_impl='flash')
  assert MDTConfig(masked_attention_impl=None).masked_impl is None
  assert MDTConfig(attention_impl='xla').masked_impl == 'xla'  # 'same' by default


def test_cpu_code_computes_what_the_accelerator_code_computes():
  """XLA:CPU's branches (2-D dense products, the einsum attention; mdt_jax.models.platform) give
  the outputs and gradients of the general code: the masked pass runs both (the encoder with a
  key mask, the side block and decoder without), with label drops."""
  cfg = tiny(mask_ratio=0.3, depth=3, decode_layer=1)
  _, model = _load_random(cfg, seed=4)
  x, t, y = (jnp.asarray(a) for a in _inputs())
  graphdef, params = nnx.split(model)

  def loss(params):
    out = nnx.merge(graphdef, params)(x, t, y, rng=jax.random.key(1), train=True, enable_mask=True)
    return jnp.mean(jnp.sin(out) * out), out

  results = []
  for backend in ('cpu', 'default'):
    with platform.assume_backend(backend):
      results.append(jax.jit(jax.grad(loss, has_aux=True))(params))
  (g_cpu, out_cpu), (g_gen, out_gen) = results
  assert float(jnp.abs(out_gen).max()) > 0.5
  np.testing.assert_allclose(out_cpu, out_gen, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_cpu), jax.tree.leaves(g_gen)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.every_backend
def test_the_cpu_compiles_the_cpu_branches_only():
  """Lowered for the CPU, the model's dense layers multiply 2-D operands and its attention is the
  einsum form (no vmapped group axis, no TPU kernel): one conditional choice, by platform."""
  m = MDT(tiny(mask_ratio=0.3), rngs=nnx.Rngs(0))
  x, t, y = (jnp.asarray(a) for a in _inputs())
  graphdef, state = nnx.split(m)

  def lowered():  # a new function each time: no cached trace
    fn = lambda s: nnx.merge(graphdef, s)(x, t, y, rng=jax.random.key(0), enable_mask=True)
    return jax.jit(fn).lower(state).as_text()

  text = lowered()
  assert 'tpu_custom_call' not in text

  def dense_ranks(text):  # operand ranks of the products without batch axes
    dots = [line for line in text.splitlines() if 'stablehlo.dot_general' in line]
    batched = [d for d in dots if 'batching_dims' in d]
    lhs = [d.split(' : (tensor<', 1)[1].split(',')[0] for d in dots if d not in batched]
    return len(batched), [t.count('x') for t in lhs]

  batched, ranks = dense_ranks(text)
  assert batched == 14  # attention's 2 einsums x 7 blocks (4 + side + 2)
  assert len(ranks) > 7 * 4 and set(ranks) == {2}, ranks
  with platform.assume_backend('default'):
    _, ranks = dense_ranks(lowered())
  assert 3 in ranks  # the general code: [batch, tokens, features]


def test_masked_encoder_uses_its_own_attention_implementation(monkeypatch):
  seen = []
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(
      jax.nn,
      'dot_product_attention',
      lambda *a, implementation=None, mask=None, **k: seen.append(
          (implementation, mask is not None)
      )
      or real(*a, implementation=implementation, mask=mask, **k),
  )
  m = MDT(tiny(mask_ratio=0.3, attention_impl='xla', masked_attention_impl=None), rngs=nnx.Rngs(0))
  x, t, y = (jnp.asarray(a) for a in _inputs())
  m(x, t, y)
  assert set(seen) == {('xla', False)} and len(seen) == 6  # plain pass: 6 blocks
  seen.clear()
  with platform.assume_backend('default'):  # on the CPU, auto is the einsum form (no call)
    m(x, t, y, rng=jax.random.key(0), enable_mask=True)
  # encoder (4 blocks) on the kept tokens with a key mask; side block and decoder (1 + 2) not
  assert seen == [(None, True)] * 4 + [('xla', False)] * 3
