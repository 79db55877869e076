"""Resume on another mesh, device count or process count (pod slices change size between
preemptions): the restored state is the saved one bit for bit, and training goes on with the
same batches and draws. What is and is not exact across meshes: docs/training_at_scale.md."""

import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from micro_config import get_config
from mdt_jax.training.loop import train_and_evaluate


def _config(total: int, **mesh):
  c = get_config()
  c.total_steps = total
  c.mesh.update({**dict(data=1, fsdp=1, tensor=1), **mesh})
  return c


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _copy(full_run, path):
  shutil.copytree(full_run[0], path)
  return str(path)


@pytest.fixture(scope='module')
def continued(full_run, tmp_path_factory):
  """The reference: full_run's 8-device run (data 8) continued from its step-6 checkpoint."""
  work = _copy(full_run, tmp_path_factory.mktemp('continued') / 'w')
  return train_and_evaluate(_config(8, data=8), work)


@pytest.mark.parametrize(
    'mesh, num_devices',
    [
        (dict(data=4), 4),  # a smaller slice
        (dict(data=2, fsdp=2, tensor=2), 8),  # parameters and optimizer state split
    ],
)
def test_resume_on_another_mesh(full_run, continued, tmp_path, mesh, num_devices):
  work = _copy(full_run, tmp_path / 'w')
  devices = jax.devices()[:num_devices]
  # total_steps = the saved step: the run restores and stops, returning the restored state
  restored = train_and_evaluate(_config(6, **mesh), work, devices=devices)
  assert restored['step'] == 6
  saved = full_run[1]['state']
  for a, b in zip(_leaves(restored['state']), _leaves(saved)):
    np.testing.assert_array_equal(a, b)
  kernel = restored['state'].params['en_outblocks'][0]['mlp']['fc1']['kernel']
  assert kernel.sharding.mesh.devices.size == num_devices
  assert set(kernel.sharding.device_set) == set(devices)
  if mesh.get('fsdp', 1) > 1:
    assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')  # re-laid out
  out = train_and_evaluate(_config(8, **mesh), work, devices=devices)
  assert out['step'] == 8 and np.isfinite(out['loss'])
  # the same batches and draws as the 8-device continuation: the same run up to the order of
  # float sums over devices (measured: parameters within 3e-8)
  np.testing.assert_allclose(out['loss'], continued['loss'], rtol=1e-6)
  for a, b in zip(_leaves(out['state'].params), _leaves(continued['state'].params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_resume_on_another_process_count(full_run, continued, tmp_path):
  """A checkpoint of 2 processes (one data position file each) resumes on 1: every process's
  position is the number of steps taken, and the global batch of a step is the same for any
  process count (mdt_jax.data.pipeline), so the run goes on exactly."""
  work = _copy(full_run, tmp_path / 'w')
  data = tmp_path / 'w' / 'checkpoints' / '6' / 'data'
  position = (data / 'process_0-of-1.json').read_text()
  (data / 'process_0-of-1.json').unlink()
  for p in range(2):
    (data / f'process_{p}-of-2.json').write_text(position)
  out = train_and_evaluate(_config(8, data=8), work)
  for a, b in zip(_leaves(out['state']), _leaves(continued['state'])):
    np.testing.assert_array_equal(a, b)
  # positions that disagree cannot be one global position: refused, naming the files
  work = _copy(full_run, tmp_path / 'bad')
  data = tmp_path / 'bad' / 'checkpoints' / '6' / 'data'
  (data / 'process_0-of-1.json').rename(data / 'process_0-of-2.json')
  (data / 'process_1-of-2.json').write_text('{"next_index": 5}')
  with pytest.raises(
      ValueError, match=r'data positions of the processes .* differ .*process_1-of-2.json'
  ):
    train_and_evaluate(_config(8, data=8), work)


@pytest.mark.parametrize(
    'mesh, stored',
    [
        # ZeRO: weights, EMA and Adan state split over all 8 data-parallel devices
        (dict(strategy='zero', data=8), P(None, 'data')),
        # FSDP inside groups of 4, ZeRO across the 2 groups
        (dict(strategy='hybrid', data=2, fsdp=4), P(('fsdp', 'data'), None)),
    ],
)
def test_resume_and_train_across_strategies(full_run, continued, tmp_path, mesh, stored):
  """A data-parallel checkpoint restores bit for bit under another strategy, trains on as the
  data-parallel run does (to float tolerance), and its own checkpoint restores exactly under
  data parallelism again."""
  work = _copy(full_run, tmp_path / 'w')
  restored = train_and_evaluate(_config(6, **mesh), work)
  for a, b in zip(_leaves(restored['state']), _leaves(full_run[1]['state'])):
    np.testing.assert_array_equal(a, b)
  kernel = restored['state'].params['en_outblocks'][0]['mlp']['fc1']['kernel']  # [32, 128]
  # the Adan moments and the EMA are laid out like the parameters
  alike = [x for x in jax.tree.leaves(restored['state']) if x.shape == kernel.shape]
  assert len(alike) > 3 and {_normal(x.sharding.spec) for x in alike} == {_normal(stored)}
  out = train_and_evaluate(_config(8, **mesh), work)
  np.testing.assert_allclose(out['loss'], continued['loss'], rtol=1e-6)
  for a, b in zip(_leaves(out['state']), _leaves(continued['state'])):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  back = train_and_evaluate(_config(8, data=8), work)  # restores step 8 and stops
  for a, b in zip(_leaves(back['state']), _leaves(out['state'])):
    np.testing.assert_array_equal(a, b)


def _normal(spec):
  """A PartitionSpec with one-axis tuples written as the axis."""
  return tuple(e[0] if isinstance(e, tuple) and len(e) == 1 else e for e in spec)
