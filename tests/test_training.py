"""Training: optimizer, sharded step, config checks, checkpoints, exact resume, preemption, NaN stop."""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import launch
import mdt_jax
from micro_config import get_config
from tensorboard_events import HPARAMS, read_events, scalar
from mdt_jax import MDTConfig
from mdt_jax import diffusion
from mdt_jax.configs_base import DEFAULT_RULES
from mdt_jax.training import checkpoints, sharding
from mdt_jax.training import state as st
from mdt_jax.training import step as stp
from mdt_jax.training.run import validate
from benchmarks import profile
from mdt_jax.training.loop import PROFILE_AFTER_STEPS, train_and_evaluate


def micro_config(**kw) -> ml_collections.ConfigDict:
  c = get_config()
  for k, v in kw.items():
    c[k] = v
  return c


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


# ----------------------------------------------------------------------------------- optimizer


def test_adan_matches_the_spec_update():
  """Global clipping then Adan = the update written in the spec (optax.adan is not: see adan.py)."""
  cfg = ml_collections.ConfigDict(
      dict(
          name='adan',
          learning_rate=0.01,
          b1=0.98,
          b2=0.92,
          b3=0.99,
          eps=1e-8,
          weight_decay=0.0,
          clip_norm=1.0,
      )
  )
  opt = st.make_optimizer(cfg)
  rng = np.random.default_rng(0)
  theta = rng.standard_normal(5)
  params = jnp.asarray(theta, jnp.float32)
  state = opt.init(params)
  m = d = n = np.zeros(5)
  g_prev = None
  for k in range(1, 6):
    g = rng.standard_normal(5) * (3.0 if k % 2 else 0.3)
    upd, state = opt.update(jnp.asarray(g, jnp.float32), state, params)
    params = params + upd
    g = g * min(1.0, 1.0 / np.linalg.norm(g))
    diff_g = np.zeros(5) if g_prev is None else g - g_prev
    m = 0.98 * m + 0.02 * g
    d = 0.92 * d + 0.08 * diff_g
    n = 0.99 * n + 0.01 * (g + 0.92 * diff_g) ** 2
    denom = np.sqrt(n) / np.sqrt(1 - 0.99**k) + 1e-8
    theta = theta - 0.01 * (m / (1 - 0.98**k) + 0.92 * d / (1 - 0.92**k)) / denom
    g_prev = g
  np.testing.assert_allclose(np.asarray(params), theta, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- sharded train step


@pytest.fixture(scope='module')
def step_setup():
  c = micro_config()
  mc = MDTConfig.from_dict(c.model.to_dict())
  opt = st.make_optimizer(c.optimizer)
  rng = np.random.default_rng(0)
  batch = {
      'x': rng.standard_normal((16, 8, 8, 1)).astype(np.float32),
      'y': rng.integers(0, 10, 16).astype(np.int32),
  }
  return c, mc, opt, batch


def _run_steps(setup, mesh_shape, n=3, mask_branch=True):
  c, mc, opt, batch = setup
  devices = jax.devices()[: int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(dict(zip(('data', 'fsdp', 'tensor'), mesh_shape)), devices)
  state, shardings, graphdef = st.create_train_state(mc, opt, 0, mesh, DEFAULT_RULES)
  fn = stp.jit_train_step(
      shardings,
      sharding.batch_sharding(mesh),
      graphdef=graphdef,
      process=diffusion.create_diffusion(),
      optimizer=opt,
      ema_decay=0.9,
      mask_branch=mask_branch,
      min_snr_gamma=5.0,
      learning_rate=1e-3,
  )
  b = jax.device_put(batch, sharding.batch_sharding(mesh))
  losses = []
  for _ in range(n):
    state, metrics = fn(state, b)
    losses.append(float(metrics['loss']))
  assert fn._cache_size() == 1
  return state, losses


@pytest.fixture(scope='module')
def single_device(step_setup):
  return _run_steps(step_setup, (1, 1, 1))


@pytest.mark.parametrize('shape', [(8, 1, 1), (4, 1, 1), (2, 2, 2)])  # (4, 1, 1): 4 devices
def test_mesh_matches_single_device(step_setup, single_device, shape):
  ref_state, ref_losses = single_device
  assert np.isfinite(ref_losses).all() and ref_losses[0] != ref_losses[-1]
  state, losses = _run_steps(step_setup, shape)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(_leaves(state.params), _leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, atol=2e-6)
  for a, b in zip(_leaves(state.ema_params), _leaves(ref_state.ema_params)):
    np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize('optimizer', ['adan', 'adamw'])
def test_abstract_state_is_what_the_initializer_returns(step_setup, optimizer):
  """The state's shapes and dtypes, read off the abstract model, are those of the traced init
  (params, EMA, every optimizer moment, step, RNG key data)."""
  c, mc, _, _ = step_setup
  opt = st.make_optimizer(ml_collections.ConfigDict({**c.optimizer.to_dict(), 'name': optimizer}))
  mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
  structs, _, _ = st.abstract_train_state(mc, opt, mesh, DEFAULT_RULES)
  traced = jax.eval_shape(st._initializer(mc, opt, 0))
  assert jax.tree.structure(structs) == jax.tree.structure(traced)
  for a, b in zip(jax.tree.leaves(structs), jax.tree.leaves(traced)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)


def test_param_shardings_follow_the_rules(step_setup):
  c, mc, opt, _ = step_setup
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  state, shardings, _ = st.create_train_state(mc, opt, 0, mesh, DEFAULT_RULES)
  P = jax.sharding.PartitionSpec
  blk = state.params['en_outblocks'][0]
  assert blk['attn']['qkv']['kernel'].sharding.spec == P('fsdp', 'tensor')  # embed, heads
  assert blk['attn']['proj']['kernel'].sharding.spec == P('tensor', 'fsdp')  # heads, embed
  assert blk['mlp']['fc1']['kernel'].sharding.spec == P('fsdp', 'tensor')  # embed, mlp
  assert blk['skip_linear']['kernel'].sharding.spec == P('fsdp', None)  # embed2 | embed
  assert blk['adaLN_modulation_1']['bias'].sharding.spec == P('tensor')  # ada
  # the 11-row class table (10 + null) cannot be split in 2: replicated
  assert state.params['y_embedder']['embedding_table']['embedding'].sharding.spec == P(None, 'fsdp')
  assert state.ema_params['final_layer']['linear']['kernel'].sharding.spec == P('fsdp', None)
  # optimizer moments are sharded like their parameters
  moments = [
      x for x in jax.tree.leaves(state.opt_state) if x.shape == blk['mlp']['fc1']['kernel'].shape
  ]
  assert moments and all(x.sharding.spec == P('fsdp', 'tensor') for x in moments)
  with pytest.raises(ValueError, match='needs 16 devices, 8 are available'):
    sharding.make_mesh({'data': 4, 'fsdp': 4})


def test_a_rule_that_cannot_apply_is_named(step_setup, caplog):
  """A mesh axis that does not divide its dimension replicates it, with a warning naming the
  parameter; a logical name without a rule, or a rule to an unknown mesh axis, is refused."""
  _, mc, _, _ = step_setup
  params = nnx.state(st.abstract_model(mc))
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  rules = dict(DEFAULT_RULES)
  with caplog.at_level('WARNING', logger='absl'):
    got = sharding.param_shardings(params, mesh, {**rules, 'vocab': 'tensor'}.items())
  P = jax.sharding.PartitionSpec
  assert got['y_embedder']['embedding_table']['embedding'].spec == P(None, 'fsdp')
  assert (
      'parameter y_embedder.embedding_table.embedding dimension 0 (size 11, logical axis '
      "'vocab') is replicated: mesh axis tensor of size 2 does not divide it"
  ) in caplog.text
  assert caplog.text.count('is replicated') == 1  # the default rules all apply here
  del rules['vocab']
  with pytest.raises(ValueError, match="embedding dimension 0: logical axis 'vocab' has no "):
    sharding.param_shardings(params, mesh, rules.items())
  with pytest.raises(ValueError, match=r"names mesh axes \['model'\]"):
    sharding.param_shardings(params, mesh, [('embed', 'model')])


def test_dit_baseline_has_no_masked_branch(step_setup, single_device):
  _, losses = _run_steps(step_setup, (1, 1, 1), n=1, mask_branch=False)
  _, both = single_device
  assert losses[0] < both[0]  # one branch's loss vs the sum of two


# ------------------------------------------------------------------------------ config checks


def test_bad_configs_are_refused_before_training(tmp_path):
  c = micro_config()
  c.model.hidden_sizee = 3
  with pytest.raises(ValueError, match=r"unknown model config keys \['hidden_sizee'\]"):
    validate(c)
  c = micro_config()
  with c.unlocked():
    c.learning_rate = 1.0
  with pytest.raises(ValueError, match=r"unknown config keys \['learning_rate'\]"):
    validate(c)
  c = micro_config(global_batch_size=12)
  with pytest.raises(
      ValueError, match='global_batch_size 12 is not divisible by the data-parallel size 8'
  ):
    train_and_evaluate(c, str(tmp_path / 'a'))
  c = micro_config()
  c.model.input_size = 16
  with pytest.raises(ValueError, match='gives 8x8x1 inputs but model expects input_size=16'):
    validate(c)
  assert not (tmp_path / 'a').exists()


def test_workdir_of_another_model_is_refused(full_run, tmp_path):
  work = tmp_path / 'w'
  shutil.copytree(full_run[0], work)
  c = micro_config(total_steps=9)
  c.model.hidden_size = 64
  with pytest.raises(
      ValueError,
      match='holds a run of another model shape .*hidden_size: workdir 32 vs config 64',
  ):
    train_and_evaluate(c, str(work))
  # compute options are not the model's shape: a run may resume with cuDNN's padded buffer etc.
  c = micro_config(total_steps=9)
  c.model.update(
      dtype='bfloat16',
      remat=True,
      attention_impl='xla',
      mask_buffer_multiple=8,
      residual_dtype='compute',
  )
  checkpoints.check_workdir(str(work), validate(c))
  c = micro_config(total_steps=9)
  c.optimizer.clip_norm = 0.0  # another optimizer-state structure
  with pytest.raises(ValueError, match='checkpoint at step 6 .* does not match this config'):
    train_and_evaluate(c, str(work))


def test_synchronous_checkpoints_resume_exactly_and_load_pretrained_reads_workdir(
    full_run, tmp_path
):
  """The synchronous mode's own test (every other run checkpoints asynchronously, the default):
  stopped at 3 and resumed to 6, it equals the uninterrupted asynchronous run."""
  work, full = full_run
  assert get_config().async_checkpointing
  sync = lambda total: micro_config(total_steps=total, async_checkpointing=False)
  train_and_evaluate(sync(3), str(tmp_path / 'split'))
  resumed = train_and_evaluate(sync(6), str(tmp_path / 'split'))
  assert resumed['step'] == 6
  for a, b in zip(_leaves(full['state'].ema_params), _leaves(resumed['state'].ema_params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_leaves(full['state'].opt_state), _leaves(resumed['state'].opt_state)):
    np.testing.assert_array_equal(a, b)
  # the workdir loads as a model with the latest EMA weights
  model = mdt_jax.load_pretrained(str(work))
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for a, b in zip(_leaves(got), _leaves(full['state'].ema_params)):
    np.testing.assert_array_equal(a, b)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(full_run, tmp_path):
  work = tmp_path / 'nan'
  shutil.copytree(full_run[0], work)
  ckpt = work / 'checkpoints' / '6'
  before = {p: p.stat().st_mtime for p in ckpt.rglob('*')}
  c = micro_config(total_steps=12)
  c.optimizer.learning_rate = 1e30
  with pytest.raises(
      FloatingPointError,
      match=r'loss is (nan|inf) at step \d+; training stopped.'
      r' The last good checkpoint \(step 6\)',
  ):
    train_and_evaluate(c, str(work))
  assert launch.steps_saved(str(work))[-1] == 6
  assert before == {p: p.stat().st_mtime for p in ckpt.rglob('*')}


def test_metrics_are_written_to_tensorboard(full_run):
  """The scalars read back from the event file: every metric at every log step, the last ones
  equal to what the run returned, the total loss the sum of the branches'."""
  work, out = full_run
  events = read_events(str(work))
  for k in (
      'loss',
      'plain/loss',
      'plain/mse',
      'plain/vb',
      'masked/loss',
      'masked/mse',
      'masked/vb',
      'grad_norm',
      'learning_rate',
      'images_per_sec',
  ):
    assert sorted(events[k]) == [3, 6], (k, sorted(events[k]))  # log_every_steps=3
    for step in (3, 6):
      assert np.isfinite(scalar(events, k, step)), (k, step)
    assert scalar(events, k, 6) == pytest.approx(out[k], rel=1e-6), k  # float32 in the file
  for step in (3, 6):
    assert scalar(events, 'learning_rate', step) == pytest.approx(1e-3, rel=1e-6)
    branches = scalar(events, 'plain/loss', step) + scalar(events, 'masked/loss', step)
    assert scalar(events, 'loss', step) == pytest.approx(branches, rel=1e-6)
  cfg = json.loads((work / 'config.json').read_text())
  assert cfg['model']['hidden_size'] == 32
  # the run's start: the config as hyperparameters and text, clu's parameter table as text
  [hparams] = events[HPARAMS][0]
  assert hparams['model.hidden_size'] == 32 and hparams['total_steps'] == 6
  [config_text] = events['config'][0]
  assert '    global_batch_size: 16' in config_text.splitlines()
  [table] = events['parameters'][0]
  assert 'x_embedder.proj.kernel' in table and 'Total: ' in table


@pytest.mark.slow
def test_preempted_killed_and_resumed_run_matches_uninterrupted_run(full_run, tmp_path, caplog):
  """The command line with the default asynchronous checkpoints, interrupted twice at fixed
  steps (the run signals itself, tests/launch.py): a SIGTERM after step 3 saves step 3 and
  exits cleanly; the resumed run is SIGKILLed after step 5, while the checkpoint of step 4 may
  still be in flight; resumed again, it ends with the uninterrupted run's weights, bit for bit."""
  work = str(tmp_path / 'w')
  every = '--config.checkpoint_every_steps=2'
  out = launch.run(launch.main_command(work, 6, every, signal_at=(3, 'SIGTERM')))
  assert out.returncode == 0, out.stdout[-3000:]
  assert 'SIGTERM received' in out.stdout
  assert 'stopping at step 3 after the preemption checkpoint' in out.stdout
  assert launch.steps_saved(work) == [2, 3]
  out = launch.run(launch.main_command(work, 6, every, signal_at=(5, 'SIGKILL')))
  assert out.returncode == -signal.SIGKILL, out.stdout[-3000:]
  assert 'resuming from step 3' in out.stdout
  saved = launch.steps_saved(work)
  # step 4's asynchronous save was started before the kill; whether it was committed is the
  # kill's timing, and either way only committed checkpoints count
  assert saved in ([2, 3], [2, 3, 4]), saved
  with caplog.at_level('INFO', logger='absl'):
    resumed = train_and_evaluate(micro_config(total_steps=6), work)
  assert f'resuming from step {saved[-1]}' in caplog.text
  full = full_run[1]
  assert resumed['step'] == 6 and launch.steps_saved(work)[-1] == 6
  for name in ('params', 'ema_params', 'opt_state'):
    for a, b in zip(
        _leaves(getattr(full['state'], name)), _leaves(getattr(resumed['state'], name))
    ):
      np.testing.assert_array_equal(a, b, err_msg=name)


def test_profile_captures_a_trace(full_run):
  """--profile (config.profile_steps) writes a jax.profiler trace TensorBoard's plugin opens, of
  steps counted from the run's first (the shared run profiles steps 3 and 4)."""
  work, out = full_run
  assert out['step'] == 6 and PROFILE_AFTER_STEPS == 2
  traces = [f for _, _, fs in os.walk(work) for f in fs if f.endswith('.xplane.pb')]
  assert len(traces) == 1, traces
  # tools/profile_summary.py reads it: the profiled train steps' ops, tied to the model's code
  summary = profile.summarize(str(work), 'train_step')
  assert summary.total_ps > 0
  assert any(src.startswith('mdt_jax/models/') for src, _ in summary.by_source[:5])
