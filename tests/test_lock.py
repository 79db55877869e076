"""One writer per workdir (mdt_jax/training/lock.py): a second run is refused naming the holder,
a lock whose holder is gone is taken over, on a local disk and on object storage."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import launch
from micro_config import get_config
from mdt_jax import errors
from mdt_jax.training import lock
from mdt_jax.training.loop import train_and_evaluate


def _holder(path) -> dict:
  return json.loads(open(path).read()) if isinstance(path, str) else json.loads(path.read_text())


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
  with lock.WorkdirLock(str(tmp_path)) as first:
    first.acquire()
    held = _holder(tmp_path / 'lock.json')
    assert held['pid'] == os.getpid() and held['host'] == socket.gethostname()
    with pytest.raises(errors.Locked) as e:
      lock.WorkdirLock(str(tmp_path)).acquire()
    assert re.fullmatch(
        rf'workdir {tmp_path} is in use: held by pid {os.getpid()} on {socket.gethostname()}, '
        rf'started .* UTC, heartbeat \d+ s ago \({tmp_path}/lock.json\)\. Stop that run first; '
        rf'if it is gone, remove {tmp_path}/lock.json or pass --force_unlock',
        str(e.value),
    ), str(e.value)
    with pytest.raises(errors.Locked):  # the check at the start of a run: nothing written
      lock.WorkdirLock(str(tmp_path)).__enter__()
    assert _holder(tmp_path / 'lock.json') == held
  assert not (tmp_path / 'lock.json').exists()  # released


def _write_lock(path, **fields):
  now = time.time()
  holder = dict(host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now, token='x')
  holder.update(fields)
  path.write_text(json.dumps(holder))
  return holder


def _dead_pid() -> int:
  proc = subprocess.Popen(['true'])
  proc.wait()
  return proc.pid


@pytest.mark.parametrize(
    'fields, why',
    [
        (lambda: dict(pid=_dead_pid()), r'pid \d+ is not running on this host'),
        (
            lambda: dict(host='another-host', pid=1, heartbeat=time.time() - 100),
            r'its heartbeat is 1\d\d s old \(stale after 60 s\)',
        ),
        (lambda: dict(token='left by an earlier run'), 'an earlier run of this process left it'),
    ],
    ids=['dead pid', 'old heartbeat', 'this process'],
)
def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path, caplog, fields, why):
  _write_lock(tmp_path / 'lock.json', **fields())
  with lock.WorkdirLock(str(tmp_path), stale_after_s=60) as taken:
    taken.acquire()
    assert _holder(tmp_path / 'lock.json')['token'] == taken.holder.token
  assert re.search(f'taking over the lock of {tmp_path} from .*: {why}', caplog.text), caplog.text


def test_a_live_lock_of_another_host_is_kept_unless_forced(tmp_path, caplog):
  _write_lock(tmp_path / 'lock.json', host='another-host', pid=1)
  with pytest.raises(errors.Locked, match='held by pid 1 on another-host'):
    lock.WorkdirLock(str(tmp_path), stale_after_s=60).acquire()
  with lock.WorkdirLock(str(tmp_path), force=True) as forced:
    forced.acquire()
  assert 'taking over the lock' in caplog.text and '--force_unlock' in caplog.text


def test_the_heartbeat_is_refreshed(tmp_path):
  with lock.WorkdirLock(str(tmp_path), stale_after_s=0.2) as held:
    held.acquire()
    first = _holder(tmp_path / 'lock.json')['heartbeat']
    deadline = time.time() + 30
    while _holder(tmp_path / 'lock.json')['heartbeat'] == first and time.time() < deadline:
      time.sleep(0.05)
    assert _holder(tmp_path / 'lock.json')['heartbeat'] > first


def test_object_storage_lock_is_generation_conditioned(gcs):
  workdir = f'{gcs}/lock-test'
  with lock.WorkdirLock(workdir) as first:
    first.acquire()
    with pytest.raises(errors.Locked, match=f'workdir {workdir} is in use: held by pid'):
      lock.WorkdirLock(workdir).acquire()
    store = lock._ObjectStore(f'{workdir}/lock.json')
    found, generation = store.read()
    assert found['token'] == first.holder.token
    assert not store.create(b'{}')  # the object exists: ifGenerationMatch=0 fails
    assert not store.replace(b'{}', int(generation) + 1)  # another generation: refused
    first.heartbeat()  # the holder's replace, under its own generation
    assert store.read()[0]['heartbeat'] >= found['heartbeat']
  assert store.read() == (None, None)


# ------------------------------------------------------------------ two trainers, one workdir


def _leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_a_second_trainer_is_refused_and_a_restart_after_sigkill_resumes(full_run, tmp_path):
  """The first trainer stops (SIGSTOP, alive) inside its step-6 save, after checkpoint 3; a
  second one on its workdir exits at once naming the workdir and the holder; after a SIGKILL of
  the first, a new start takes the lock over and resumes from step 3 to the same weights."""
  work = str(tmp_path / 'w')
  log = open(tmp_path / 'first.log', 'w')
  first = subprocess.Popen(
      launch.main_command(work, 6),
      env=launch.env(MDT_JAX_FAULT='checkpoint@5:stop'),
      stdout=log,
      stderr=subprocess.STDOUT,
  )
  try:
    deadline = time.time() + 300
    while not launch.steps_saved(work) and first.poll() is None and time.time() < deadline:
      time.sleep(0.2)
    assert launch.steps_saved(work) == [3], first.poll()
    line = launch.run_user_error(launch.main_command(work, 6), timeout=120)
    assert re.fullmatch(
        rf'error: workdir {work} is in use: held by pid {first.pid} on {socket.gethostname()}, '
        r'started .*',
        line,
    ), line
    assert not launch.steps_saved(work)[1:]  # the second wrote nothing
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()  # reaped: its pid is gone
    log.close()
  third = launch.run(launch.main_command(work, 6))
  assert third.returncode == 0, third.stdout
  assert re.search(rf'taking over the lock of {work} from pid {first.pid}', third.stdout)
  assert 'resuming from step 3' in third.stdout
  assert not os.path.exists(os.path.join(work, 'lock.json'))
  out = train_and_evaluate(get_config(), work)  # the finished run: restored, no step taken
  assert out['step'] == 6
  for a, b in zip(_leaves(out['state'].params), _leaves(full_run[1]['state'].params)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ several processes, one job

_JOB = r"""
import json, os, sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(
    coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2])
)
from jax.experimental import multihost_utils
from mdt_jax import errors
from mdt_jax.training import lock

free, held = sys.argv[3], sys.argv[4]
out = {'pid': os.getpid()}
with lock.WorkdirLock(free) as job:  # a workdir nobody holds: process 0 takes it for the job
  job.acquire()
  out['holds'] = job.holder is not None
  out['beats'] = job._thread is not None
  multihost_utils.sync_global_devices('taken')
  out['file'] = json.load(open(os.path.join(free, 'lock.json')))['pid']
  multihost_utils.sync_global_devices('read')
multihost_utils.sync_global_devices('released')  # process 0 removed its lock on leaving
out['released'] = not os.path.exists(os.path.join(free, 'lock.json'))
for step in ('enter', 'acquire'):  # a workdir a live run holds: every process refused
  try:
    if step == 'enter':
      lock.WorkdirLock(held).__enter__()
    else:
      lock.WorkdirLock(held).acquire()
    out[step] = None
  except errors.Locked as e:
    out[step] = str(e)
print('RESULT ' + json.dumps(out), flush=True)
"""


def test_one_lock_per_job_taken_by_process_0(tmp_path):
  """Two processes of one job (jax.distributed on CPU, gloo): process 0 takes the workdir's lock
  and the other takes none (no file, no heartbeat) and goes on when process 0 has it; on a
  workdir a live run holds, process 0's refusal is every process's, at the start's check and at
  the take."""
  free, held = tmp_path / 'free', tmp_path / 'held'
  free.mkdir()
  held.mkdir()
  holder = _write_lock(held / 'lock.json')  # this process, alive, on this host
  address = f'127.0.0.1:{launch.free_port()}'
  env = launch.env(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  procs = [
      subprocess.Popen(
          [sys.executable, '-c', _JOB, address, str(i), str(free), str(held)],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  try:
    outs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  results = []
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
    results.append(json.loads(re.search(r'^RESULT (.*)$', out, re.M)[1]))
  first, other = results
  assert (first['holds'], first['beats'], other['holds'], other['beats']) == (
      True,
      True,
      False,
      False,
  )
  assert first['file'] == other['file'] == first['pid']  # process 0's lock, seen by both
  assert first['released'] and other['released']
  for step in ('enter', 'acquire'):
    assert re.match(
        rf'workdir {held} is in use: held by pid {holder["pid"]} on {socket.gethostname()}',
        first[step],
    ), first[step]
    assert other[step] == f'workdir {held} is in use by another run (process 0 found it)'
  assert _holder(held / 'lock.json') == holder  # nobody took it
