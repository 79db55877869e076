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
  fs.invalidate_cache()  # gcsfs caches listings; the tests look at fresh state
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
  cmd = [
      sys.executable,
      '-m',
      'mdt_jax.main',
      f'--config={ROOT}/tests/micro_config.py',
      f'--workdir={work}',
  ]
  proc = subprocess.Popen(
      cmd,
      env=dict(os.environ, PYTHONPATH=ROOT),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
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
  for a, b in zip(
      _leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))), _leaves(ref['state'].ema_params)
  ):
    np.testing.assert_array_equal(a, b)


def test_tensorboard_events_and_config_reach_the_bucket(trained, tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  work = paths.path(trained['work'])
  assert json.loads((work / 'config.json').read_text())['model']['hidden_size'] == 32
  events = sorted(work.glob('events.out.tfevents.*'))
  assert len(events) == 2, events  # the killed run's (uploaded at its checkpoint), the resume's
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
  assert not paths.path(target).exists()  # nothing was committed
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
  assert names == [atomic.MARKER, 'a.txt']  # the old folder is left as it was
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


def test_export_to_gcs_then_load_and_sample_with_resume(gcs, full_run):
  """Export of a (local) workdir to a gs:// model folder, load_pretrained from it, sampling
  into a gs:// folder, and a restart that skips the finished shards."""
  from mdt_jax.hub import export
  from mdt_jax.sampling import SamplerConfig, build_sampler, generate
  from mdt_jax.images import to_uint8
  from mdt_jax.sampling.run import run_sampling

  out = f'{gcs}/export/mdt-micro'
  assert export.export_workdir(str(full_run[0]), out) == out
  names = sorted(p.name for p in paths.path(out).iterdir())
  assert names == sorted([atomic.MARKER, 'README.md', 'config.json', 'model.safetensors'])
  model = mdt_jax.load_pretrained(out)
  for a, b in zip(
      _leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
      _leaves(full_run[1]['state'].ema_params),
  ):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileExistsError, match='exists and is not empty'):
    export.export_workdir(str(full_run[0]), out)

  sampler = build_sampler(model, SamplerConfig(sampler='ddim', steps=2, cfg_scale=2.0))
  folder = f'{gcs}/samples'
  kw = dict(
      out_dir=folder,
      num_samples=5,
      labels='balanced',
      seed=1,
      batch_size=8,
      shard_size=2,
      grid_size=4,
  )
  npz = run_sampling(sampler, **kw)
  assert npz == f'{folder}/samples.npz'
  with paths.path(npz).open('rb') as f, np.load(f) as z:
    images = z['arr_0']
  np.testing.assert_array_equal(
      images, to_uint8(generate(sampler, np.arange(5) % 10, seed=1, batch_size=8, log_every=0))
  )
  assert (paths.path(folder) / 'samples_grid.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # a restart samples only what is missing: shard 1 (5 samples in shards of 2) and the merge
  (paths.path(folder) / 'shards' / 'shard_00001.npz').unlink()
  paths.path(npz).unlink()
  calls = []
  real = sampler.fn
  sampler.fn = lambda *a: calls.append(1) or real(*a)
  try:
    run_sampling(sampler, **kw)
  finally:
    sampler.fn = real
  assert len(calls) == 1  # one batch: the missing shard's two samples
  with paths.path(npz).open('rb') as f, np.load(f) as z:
    np.testing.assert_array_equal(z['arr_0'], images)

  # A folder whose publication did not finish is refused, with the reason.
  (paths.path(out) / atomic.MARKER).unlink()
  with pytest.raises(FileNotFoundError, match='has no _COMPLETE marker'):
    mdt_jax.load_pretrained(out)


def _latent_shards(folder, num_shards=2, per_shard=6, seed=0):
  from array_record.python.array_record_module import ArrayRecordWriter
  from mdt_jax.data.records import encode_latent_record

  rng = np.random.default_rng(seed)
  os.makedirs(folder)
  for s in range(num_shards):
    w = ArrayRecordWriter(os.path.join(folder, f'latents-{s:05d}.array_record'), 'group_size:1')
    for i in range(per_shard):
      m = rng.standard_normal((8, 8, 8)).astype(np.float32)
      w.write(encode_latent_record(m, m[:, ::-1], (s * per_shard + i) % 2))
    w.close()
  with open(os.path.join(folder, 'manifest.json'), 'w') as f:
    json.dump({'class_names': ['a', 'b']}, f)


def test_training_on_latent_shards_in_the_bucket(gcs, tmp_path):
  """The shards read from gs:// (by ArrayRecord itself) give the run the local copy gives."""
  local = str(tmp_path / 'latents')
  _latent_shards(local)
  remote = f'{gcs}/latents'
  for name in sorted(os.listdir(local)):
    with open(os.path.join(local, name), 'rb') as f:
      (paths.path(remote) / name).write_bytes(f.read())
  from mdt_jax.data import pipeline

  assert pipeline.latent_files(remote) == [
      f'{remote}/latents-0000{s}.array_record' for s in range(2)
  ]
  assert pipeline.manifest_classes(remote) == 2

  def run(path, workdir):
    # test_latent_training's config: the session's compilation cache serves both
    c = get_config()
    c.data = dict(
        name='latents',
        path=path,
        image_size=16,
        flip=True,
        num_threads=1,
        prefetch=2,
        vae=None,
    )
    c.model.input_size, c.model.in_channels, c.model.num_classes = 8, 4, 2
    c.global_batch_size, c.total_steps = 8, 2
    return train_and_evaluate(c, workdir)

  a = run(remote, f'{gcs}/latent-run')
  b = run(local, str(tmp_path / 'local-run'))
  assert a['step'] == b['step'] == 2 and a['loss'] == b['loss']
  for x, y in zip(_leaves(a['state'].params), _leaves(b['state'].params)):
    np.testing.assert_array_equal(x, y)


def test_what_needs_a_local_disk_is_refused_up_front(tmp_path):
  from mdt_jax import evaluate
  from mdt_jax.data import extract

  with pytest.raises(
      ValueError,
      match=r"latent output folder 'gs://b/latents' is on object "
      r'storage.*extract locally, then copy',
  ):
    extract.extract(None, None, 'gs://b/latents')
  with pytest.raises(SystemExit):
    evaluate.parse_args(['--samples', 'gs://b/samples.npz', '--reference', 'ref.npz'])
  with pytest.raises(ValueError, match="--out 'gs://b/x' is on object storage"):
    paths.require_local('gs://b/x', '--out', 'written on a local disk')
  assert paths.require_local('rel', '--out', '') == str(tmp_path.cwd() / 'rel')


def test_mirrored_writer_uploads_new_and_grown_files(gcs):
  """Events and profiler traces are written locally and copied to a gs:// workdir on flush."""
  from mdt_jax.training.logdir import MirroredWriter, create_writer

  work = f'{gcs}/mirror'
  writer, logdir = create_writer(work)
  assert isinstance(writer, MirroredWriter) and logdir == writer.local
  writer.write_scalars(1, {'loss': 1.0})
  trace = os.path.join(logdir, 'plugins', 'profile', 'run', 'host.xplane.pb')
  os.makedirs(os.path.dirname(trace))
  with open(trace, 'wb') as f:
    f.write(b'trace')
  writer.flush()
  events = sorted(paths.path(work).glob('events.out.tfevents.*'))
  assert len(events) == 1
  size = len(events[0].read_bytes())
  assert (paths.path(work) / 'plugins/profile/run/host.xplane.pb').read_bytes() == b'trace'
  writer.write_scalars(2, {'loss': 0.5})
  writer.close()  # the grown event file is uploaded again
  assert len(events[0].read_bytes()) > size
  assert not os.path.exists(logdir)
