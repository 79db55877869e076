"""One train step against an independent float64 NumPy computation on a tiny model.

The reference shares no code with the package: the model is tests/reference_mdt.py (official
layout, the masked pass on exactly the kept tokens), the loss tests/reference_diffusion.py, and the
clipping, Adan and EMA rules are written out below from shared/docs/mdtv2_spec.md. The step's
random draws are its inputs: `_draws` takes them from the step's key stream (one t shared by both
branches; per branch its own noise, label-dropout draw and, in the masked branch, mask), and the
reference computes everything else. The gradient is checked by central finite differences of
the reference loss in float64, along a random direction in every parameter tensor.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import reference_mdt as ref
from mdt_jax import MDTConfig, model_config
from mdt_jax import diffusion
from mdt_jax.hub import official
from mdt_jax.training import state as st
from mdt_jax.training import step as stp
from reference_diffusion import linear_betas, q_sample, ref_losses

CFG = MDTConfig.from_dict(
    model_config(
        'S/2',
        input_size=8,
        in_channels=2,
        hidden_size=16,
        depth=3,
        num_heads=2,
        decode_layer=1,
        num_classes=5,
        class_dropout_prob=0.3,
    ).to_dict()
)  # 0.3: drops happen in a batch of 8
B, GAMMA, STEP, EMA_DECAY = 8, 5.0, 5, 0.9
# clip_norm below the gradient's norm (asserted): the clipping is active. A nonzero weight decay
# checks Adan's decoupled division too (the recipe's is 0).
OPT = dict(
    name='adan',
    learning_rate=0.01,
    b1=0.98,
    b2=0.92,
    b3=0.99,
    eps=1e-8,
    weight_decay=0.05,
    clip_norm=0.1,
)
BETAS = linear_betas()
# float32 step vs float64 reference: seen within 8e-7 (the masked branch's vb term)
LOSS_RTOL = 5e-6


def _draws(rng_data: np.ndarray, step: int) -> dict:
  """The step's random inputs, from its key stream (train_step's and the model's key splits)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(rng_data), step)
  t_key, plain_key, masked_key = jax.random.split(key, 3)
  shape = (B, CFG.input_size, CFG.input_size, CFG.in_channels)
  out = {'t': np.asarray(jax.random.randint(t_key, (B,), 0, 1000))}
  for name, k in (('plain', plain_key), ('masked', masked_key)):
    noise_key, model_key = jax.random.split(k)
    drop_key, mask_key = jax.random.split(model_key)
    d = {
        'noise': np.asarray(jax.random.normal(noise_key, shape, jnp.float32), np.float64),
        'drop': np.asarray(jax.random.uniform(drop_key, (B,))) < CFG.class_dropout_prob,
    }
    if name == 'masked':  # r ~ U[0.3, 0.5) for the batch, keep floor(L (1 - r)), argsort order
      ratio_key, order_key = jax.random.split(mask_key)
      r = CFG.mask_ratio + CFG.mask_ratio_span * float(jax.random.uniform(ratio_key, ()))
      d['len_keep'] = int(np.floor(CFG.num_tokens * (1 - r)))
      d['ids'] = np.argsort(np.asarray(jax.random.uniform(order_key, (B, CFG.num_tokens))), 1)
    out[name] = d
  return out


def _branch(sd, x0, y, t, d, frozen_eps=None):
  """(mean loss, mse, vb, eps) of one branch of the reference."""
  xt = q_sample(BETAS, x0, t, d['noise'])
  y_in = np.where(d['drop'], CFG.num_classes, y)  # the null class for dropped labels
  out = ref.forward(
      sd,
      xt.transpose(0, 3, 1, 2),
      t,
      y_in,
      heads=CFG.num_heads,
      decode_layer=CFG.decode_layer,
      ids_shuffle=d.get('ids'),
      len_keep=d.get('len_keep'),
  ).transpose(0, 2, 3, 1)
  loss, mse, vb = ref_losses(BETAS, out, x0, xt, t, d['noise'], GAMMA, frozen_eps)
  return loss.mean(), mse.mean(), vb.mean(), out[..., : CFG.in_channels]


def _ref_total(sd, x0, y, draws, frozen=(None, None)):
  plain = _branch(sd, x0, y, draws['t'], draws['plain'], frozen[0])
  masked = _branch(sd, x0, y, draws['t'], draws['masked'], frozen[1])
  return plain[0] + masked[0], plain, masked


def _to_port(kind: str, v: np.ndarray) -> np.ndarray:
  """An official-layout tensor in the port's layout (the documented mapping, hub/official.py)."""
  return {'linear': lambda a: a.T, 'conv': lambda a: a.transpose(2, 3, 1, 0)}.get(
      kind, lambda a: a
  )(v)


def _at(tree, path):
  return functools.reduce(lambda node, k: node[k], path, tree)


@pytest.fixture(scope='module')
def stepped():
  """One jitted train step from a random non-initial state, and the gradient it took."""
  sd = ref.random_state_dict(official.layout(CFG), official.index_buffers(CFG), CFG.grid, seed=0)
  graphdef, state = nnx.split(official.model_from_state(sd, CFG))
  params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(state))
  rng = np.random.default_rng(1)
  x0 = np.clip(rng.normal(scale=0.7, size=(B, 8, 8, CFG.in_channels)), -1, 1)
  y = rng.integers(0, CFG.num_classes, B)
  opt = st.make_optimizer(ml_collections.ConfigDict(OPT))
  # A mid-run optimizer state (count 4, nonzero moments and previous gradient), on the scale of
  # a clipped gradient, so every term of the Adan update matters.
  leaves, treedef = jax.tree.flatten(params)
  s = OPT['clip_norm'] / np.sqrt(sum(x.size for x in leaves))
  rand = lambda f: jax.tree.unflatten(
      treedef, [jnp.asarray(f(x.shape), jnp.float32) for x in leaves]
  )
  clip_state, adan_state = opt.init(params)
  adan_state = adan_state._replace(
      count=jnp.asarray(4, jnp.int32),
      m=rand(lambda sh: s * rng.normal(size=sh)),
      d=rand(lambda sh: 0.3 * s * rng.normal(size=sh)),
      n=rand(lambda sh: (s * rng.normal(size=sh)) ** 2 + 0.1 * s**2),
      prev_grad=rand(lambda sh: s * rng.normal(size=sh)),
  )
  ema = rand(lambda sh: 0.05 * rng.normal(size=sh))
  ema = jax.tree.map(lambda p, e: p + e, params, ema)
  train_rng = np.asarray(jax.random.key_data(jax.random.key(7)))
  state = st.TrainState(
      step=jnp.asarray(STEP, jnp.int32),
      params=params,
      ema_params=ema,
      opt_state=(clip_state, adan_state),
      rng=jnp.asarray(train_rng),
  )
  batch = {'x': jnp.asarray(x0, jnp.float32), 'y': jnp.asarray(y, jnp.int32)}
  process = diffusion.create_diffusion()

  @jax.jit
  def step_and_grad(state, batch):
    # loss_fn's gradient at the key train_step uses: what the update below is computed from
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grads, _ = jax.grad(stp.loss_fn, has_aux=True)(
        state.params, graphdef, process, batch, key, mask_branch=True, min_snr_gamma=GAMMA
    )
    new, metrics = stp.train_step(
        state,
        batch,
        graphdef=graphdef,
        process=process,
        optimizer=opt,
        ema_decay=EMA_DECAY,
        mask_branch=True,
        min_snr_gamma=GAMMA,
        learning_rate=OPT['learning_rate'],
    )
    return grads, new, metrics

  old = jax.device_get(state)
  grads, new, metrics = jax.device_get(step_and_grad(state, batch))
  draws = _draws(train_rng, STEP)
  return dict(
      sd=sd,
      x0=np.asarray(batch['x'], np.float64),
      y=y,
      draws=draws,
      old=old,
      new=new,
      metrics=metrics,
      grads=grads,
  )


def test_draws_exercise_every_part_of_the_step(stepped):
  d = stepped['draws']
  drops = np.concatenate([d['plain']['drop'], d['masked']['drop']])
  assert 0 < drops.sum() < drops.size  # some labels dropped, some kept
  assert (d['plain']['drop'] != d['masked']['drop']).any()  # each branch draws its own
  assert 1 <= d['masked']['len_keep'] < CFG.num_tokens  # tokens were masked
  assert np.abs(d['plain']['noise'] - d['masked']['noise']).min() > 0


def test_losses_match_the_reference(stepped):
  m = stepped['metrics']
  total, plain, masked = _ref_total(stepped['sd'], stepped['x0'], stepped['y'], stepped['draws'])
  for prefix, want in (('plain', plain), ('masked', masked)):
    for i, term in enumerate(('loss', 'mse', 'vb')):
      np.testing.assert_allclose(
          m[f'{prefix}/{term}'], want[i], rtol=LOSS_RTOL, err_msg=f'{prefix}/{term}'
      )
  np.testing.assert_allclose(m['loss'], total, rtol=LOSS_RTOL)  # plain + masked, 1:1
  # the tolerance tells a masked pass from a plain one on the masked branch's draws (240x)
  unmasked = dict(stepped['draws']['masked'], ids=None, len_keep=None)
  as_plain = _branch(stepped['sd'], stepped['x0'], stepped['y'], stepped['draws']['t'], unmasked)
  assert abs(as_plain[0] - masked[0]) > 100 * LOSS_RTOL * masked[0]


def test_gradient_matches_finite_differences_of_the_reference(stepped):
  """Along a random direction in each parameter tensor: <grad, v> vs (L(+hv) - L(-hv)) / 2h,
  with the VLB term's epsilon held at the unperturbed model's (the loss stops its gradient)."""
  sd, x0, y, draws = stepped['sd'], stepped['x0'], stepped['y'], stepped['draws']
  _, plain, masked = _ref_total(sd, x0, y, draws)
  frozen = (plain[3], masked[3])
  rng = np.random.default_rng(2)
  h = 1e-4
  nonzero = 0
  for name, entry in official.layout(CFG).items():
    v = rng.standard_normal(entry.shape)
    loss = lambda sign: _ref_total({**sd, name: sd[name] + sign * h * v}, x0, y, draws, frozen)[0]
    fd = (loss(1) - loss(-1)) / (2 * h)
    g = np.asarray(_at(stepped['grads'], entry.path), np.float64)
    got = float(np.sum(g * _to_port(entry.kind, v)))
    # float32 gradient vs float64 differences: seen within 3.3e-5 of the derivative and 7e-7
    # of |g| |v| (where the projection cancels)
    scale = np.linalg.norm(g) * np.linalg.norm(v)
    assert abs(got - fd) <= 1e-4 * abs(fd) + 1e-6 * scale, (name, got, fd, scale)
    nonzero += abs(fd) > 1e-4 * scale
  # no tensor passes by having no derivative (the smallest seen: 1.9e-3 |g| |v|), including the
  # mask token and side block, which the loss reaches only through the masked branch
  assert nonzero == len(official.layout(CFG))


def test_update_is_clipped_adan_then_ema(stepped):
  old, new, grads = stepped['old'], stepped['new'], stepped['grads']
  b1, b2, b3, eps = OPT['b1'], OPT['b2'], OPT['b3'], OPT['eps']
  lr, wd, clip = OPT['learning_rate'], OPT['weight_decay'], OPT['clip_norm']
  f64 = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  g = f64(grads)
  norm = np.sqrt(sum(np.sum(x**2) for x in g))
  np.testing.assert_allclose(stepped['metrics']['grad_norm'], norm, rtol=1e-5)
  assert norm > clip  # the clipping is active
  g = [x * clip / norm for x in g]
  adan = old.opt_state[1]
  k = int(adan.count) + 1
  want = {name: [] for name in ('m', 'd', 'n', 'params', 'ema')}
  for gi, m, d, n, prev, p, e in zip(
      g,
      f64(adan.m),
      f64(adan.d),
      f64(adan.n),
      f64(adan.prev_grad),
      f64(old.params),
      f64(old.ema_params),
  ):
    diff_g = gi - prev
    m = b1 * m + (1 - b1) * gi
    d = b2 * d + (1 - b2) * diff_g
    n = b3 * n + (1 - b3) * (gi + b2 * diff_g) ** 2
    denom = np.sqrt(n) / np.sqrt(1 - b3**k) + eps
    p = (p - lr * (m / (1 - b1**k) + b2 * d / (1 - b2**k)) / denom) / (1 + lr * wd)
    for name, value in (
        ('m', m),
        ('d', d),
        ('n', n),
        ('params', p),
        ('ema', EMA_DECAY * e + (1 - EMA_DECAY) * p),
    ):
      want[name].append(value)
  got_adan = new.opt_state[1]
  assert int(got_adan.count) == k and int(new.step) == STEP + 1
  # float32 state vs float64: seen within 5e-7 of each leaf's largest value (a swapped EMA rule
  # is off by 0.8 |ema - params|, ~0.04 here)
  close = lambda a, b, msg: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=5e-6 * np.abs(b).max(), err_msg=msg
  )
  for name, got in (
      ('m', got_adan.m),
      ('d', got_adan.d),
      ('n', got_adan.n),
      ('params', new.params),
      ('ema', new.ema_params),
  ):
    for i, (a, b) in enumerate(zip(f64(got), want[name])):
      close(a, b, f'{name} leaf {i}')
  for i, (a, b) in enumerate(zip(f64(got_adan.prev_grad), g)):
    close(a, b, f'prev_grad leaf {i}')
  # the step moved the parameters by more than the tolerance above
  moved = max(np.abs(a - b).max() for a, b in zip(f64(new.params), f64(old.params)))
  assert moved > 1e-3
