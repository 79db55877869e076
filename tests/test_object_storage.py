"""Runs on object storage: a gs:// workdir, sampling folder, model folder and latent shards, on a
GCS emulator (fake-gcs-server on loopback: the session fixture `gcs` in conftest.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import mdt_jax
from micro_config import get_config
from mdt_jax import atomic, paths
from mdt_jax.training.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fs():
  import fsspec
  fs = fsspec.filesystem('gs')
  fs.invalidate_cache()          # gcsfs caches listings; the tests look at fresh state
  return fs


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _committed_steps(workdir: str) -> list[int]:
  """Checkpoint steps that orbax finished (on object storage: commit_success.txt written)."""
  fs = _fs()
  found = fs.glob(workdir.removeprefix('gs://') + '/checkpoints/*/commit_success.txt')
  return sorted(int(p.split('/')[-2]) for p in found)


@pytest.fixture(scope='module')
def trained(gcs, full_run):
  """The micro run on gs:// by the training command, SIGKILLed after its first checkpoint and
  resumed (in this process) from what it left in the bucket."""
  work = f'{gcs}/train'
  cmd = [sys.executable, '-m', 'mdt_jax.main', f'--config={ROOT}/tests/micro_config.py',
         f'--workdir={work}']
  proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  t0 = time.time()
  while not _committed_steps(work):
    if proc.poll() is not None:
      raise AssertionError('training exited early:\n' + proc.stdout.read()[-3000:])
    if time.time() - t0 > 300:
      proc.kill()
      raise AssertionError('no checkpoint appeared in the bucket')
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  out = proc.communicate()[0]
  killed_at = _committed_steps(work)
  # A kill in the middle of a save leaves a step folder without commit_success.txt: make sure
  # the resume meets one (orbax must neither take it for a checkpoint nor trip over it).
  partial = f'{work}/checkpoints/6/params/_METADATA'
  if 6 not in killed_at:
    paths.path(partial).write_text('half-written')
  resumed = train_and_evaluate(get_config(), work)
  del out
  return dict(work=work, killed_at=killed_at, resumed=resumed, reference=full_run[1])


def test_training_on_gcs_killed_then_resumed_exactly(trained):
  assert trained['killed_at'] and trained['killed_at'][-1] < 6, trained['killed_at']
  resumed, ref = trained['resumed'], trained['reference']
  assert resumed['step'] == 6
  for a, b in zip(_leaves(ref['state'].ema_params), _leaves(resumed['state'].ema_params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_leaves(ref['state'].opt_state), _leaves(resumed['state'].opt_state)):
    np.testing.assert_array_equal(a, b)
  assert _committed_steps(trained['work']) == [3, 6]
  # the workdir loads from the bucket with the final EMA weights
  model = mdt_jax.load_pretrained(trained['work'])
  for a, b in zip(_leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
                  _leaves(ref['state'].ema_params)):
    np.testing.assert_array_equal(a, b)


def test_tensorboard_events_and_config_reach_the_bucket(trained, tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  work = paths.path(trained['work'])
  assert json.loads((work / 'config.json').read_text())['model']['hidden_size'] == 32
  events = sorted(work.glob('events.out.tfevents.*'))
  assert len(events) == 2, events       # the killed run's (synced at its checkpoint) and the resume's
  steps = set()
  for i, e in enumerate(events):
    local = tmp_path / str(i) / e.name
    local.parent.mkdir()
    local.write_bytes(e.read_bytes())
    acc = EventAccumulator(str(local.parent))
    acc.Reload()
    steps |= {ev.step for ev in acc.Tensors('loss')}
  assert steps == {3, 6}


def test_atomic_files_and_folders_on_gcs(gcs, tmp_path):
  target = f'{gcs}/atomic/file.bin'
  with pytest.raises(RuntimeError, match='boom'):
    with atomic.atomic_file(target) as f:
      f.write(b'half')
      raise RuntimeError('boom')
  assert not paths.path(target).exists()           # nothing was committed
  with atomic.atomic_file(target) as f:
    f.write(b'whole')
  assert paths.path(target).read_bytes() == b'whole'

  folder = f'{gcs}/atomic/folder'
  with atomic.atomic_folder(folder) as tmp:
    with open(os.path.join(tmp, 'a.txt'), 'w') as f:
      f.write('1')
  with pytest.raises(RuntimeError, match='boom'):
    with atomic.atomic_folder(folder, overwrite=True) as tmp:
      with open(os.path.join(tmp, 'b.txt'), 'w') as f:
        f.write('2')
      raise RuntimeError('boom')
  names = sorted(p.name for p in paths.path(folder).iterdir())
  assert names == [atomic.MARKER, 'a.txt']         # the old folder is left as it was
  with pytest.raises(FileExistsError, match='exists and is not empty'):
    with atomic.atomic_folder(folder):
      pass
  with atomic.atomic_folder(folder, overwrite=True) as tmp:
    with open(os.path.join(tmp, 'b.txt'), 'w') as f:
      f.write('2')
  names = sorted(p.name for p in paths.path(folder).iterdir())
  assert names == [atomic.MARKER, 'b.txt']
  marker = json.loads((paths.path(folder) / atomic.MARKER).read_text())
  assert marker == {'files': {'b.txt': 1}}
  atomic.require_complete(folder)
  (paths.path(folder) / atomic.MARKER).unlink()
  with pytest.raises(FileNotFoundError, match='has no _COMPLETE marker'):
    atomic.require_complete(folder)
