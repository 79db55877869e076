"""Multi-host training for real: 2 processes x 4 CPU devices on loopback (gloo collectives).

One process alone gets a SIGTERM (the run sends it to itself after step 1, tests/launch.py):
both processes must agree on a step, save it together and exit cleanly. Resumed from that
checkpoint to step 6, the pair must end with the weights of the 1-process run on 8 devices
(conftest's full_run): each process loads only its half of every global batch, and every
checkpoint (asynchronous, the default) is written and read by both processes.
"""

import os
import re
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx

import launch
import mdt_jax
from conftest import TEST_XLA_FLAGS


def _run_two_processes(workdir: str, total: int, signal_at: dict | None = None) -> list[str]:
  """Both processes to the end; `signal_at` = {process_id: (step, signal name)}."""
  port = launch.free_port()
  env = launch.env(
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=TEST_XLA_FLAGS + ' --xla_force_host_platform_device_count=4',
  )
  procs = [
      subprocess.Popen(
          launch.main_command(
              workdir,
              total,
              f'--coordinator_address=127.0.0.1:{port}',
              '--num_processes=2',
              f'--process_id={i}',
              '--cpu_collectives=gloo',
              signal_at=(signal_at or {}).get(i),
          ),
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _data_states(workdir: str, step: int) -> list[str]:
  data = os.path.join(workdir, 'checkpoints', str(step), 'data')
  return sorted(f for f in os.listdir(data) if f.endswith('.json'))


@pytest.mark.slow
def test_preempted_two_process_run_resumes_to_the_one_process_weights(full_run, tmp_path):
  work = str(tmp_path / 'two')
  outs = _run_two_processes(work, 6, signal_at={1: (1, 'SIGTERM')})
  assert 'process 1/2, 4 local / 8 global devices' in outs[1]
  stops = [re.findall(r'stopping at step (\d+) after the preemption checkpoint', o) for o in outs]
  assert stops[0] and stops[0] == stops[1], stops
  stop = int(stops[0][0])
  # JAX's preemption sync agrees on (the largest step any process reached) + 1
  assert 2 <= stop < 6, stop
  assert launch.steps_saved(work)[-1] == stop
  # every process wrote its own data-iterator state into the shared checkpoint
  assert _data_states(work, stop) == ['process_0-of-2.json', 'process_1-of-2.json']
  outs = _run_two_processes(work, 6)
  assert all(f'resuming from step {stop}' in o for o in outs)
  assert _data_states(work, 6) == ['process_0-of-2.json', 'process_1-of-2.json']
  got = nnx.to_pure_dict(nnx.state(mdt_jax.load_pretrained(work), nnx.Param))
  want = jax.device_get(full_run[1]['state'].ema_params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
