"""Multi-host training for real: 2 processes x 4 CPU devices on loopback (gloo collectives).

A 2-process run, stopped after 3 steps and resumed to 6, must end with the weights of a
1-process run on 8 devices: each process loads only its half of every global batch, the
checkpoint is written and read by both processes.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

import mdt_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch_two_processes(workdir: str, total: int) -> list[subprocess.Popen]:
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_backend_optimization_level=0 '
                       '--xla_force_host_platform_device_count=4')
  return [subprocess.Popen(
      [sys.executable, '-m', 'mdt_jax.main', f'--config={ROOT}/tests/micro_config.py',
       f'--workdir={workdir}', f'--config.total_steps={total}',
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}',
       '--cpu_collectives=gloo'],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _run_two_processes(workdir: str, total: int) -> list[str]:
  procs = _launch_two_processes(workdir, total)
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=400)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append(out)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


@pytest.mark.slow
def test_two_process_run_with_resume_matches_one_process(full_run, tmp_path):
  ref = full_run[1]                                                   # 6 steps, 8 devices
  work = str(tmp_path / 'two')
  outs = _run_two_processes(work, 3)
  assert 'process 1/2, 4 local / 8 global devices' in outs[1]
  outs = _run_two_processes(work, 6)
  assert all('resuming from step 3' in o for o in outs)
  # every process wrote its own data-iterator state into the shared checkpoint
  data_dir = os.path.join(work, 'checkpoints', '6', 'data')
  assert sorted(f for f in os.listdir(data_dir) if f.endswith('.json')) == [
      'process_0-of-2.json', 'process_1-of-2.json']
  got = nnx.to_pure_dict(nnx.state(mdt_jax.load_pretrained(work), nnx.Param))
  import jax
  want = jax.device_get(ref['state'].ema_params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_preemption_of_one_process_stops_both_at_one_checkpoint(tmp_path):
  """SIGTERM reaches one host only: both agree on a step, save it together and exit cleanly."""
  work = str(tmp_path / 'pre')
  procs = _launch_two_processes(work, 100000)
  ckpts = os.path.join(work, 'checkpoints')
  t0 = time.time()
  while not (os.path.isdir(ckpts) and any(s.isdigit() for s in os.listdir(ckpts))):
    assert all(p.poll() is None for p in procs), 'a process exited early'
    assert time.time() - t0 < 300, 'no checkpoint appeared'
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[1][-3000:]
  stops = [re.findall(r'stopping at step (\d+) after the preemption checkpoint', o) for o in outs]
  assert stops[0] and stops[0] == stops[1], stops
  step = stops[0][0]
  data = os.path.join(ckpts, step, 'data')
  assert sorted(f for f in os.listdir(data) if f.endswith('.json')) == [
      'process_0-of-2.json', 'process_1-of-2.json']
