"""Writes this folder's fixture with the code of the checkout it runs in.

  PYTHONPATH=$PWD python tests/data/legacy_95ae3d1/generate.py

It trains tests/micro_config.py (narrowed by OVERRIDES) through ``python -m mdt_jax.main``, stops
it with a SIGTERM after step 2 (the preemption path: step 2 is saved), exports that workdir with
tools/export_hub.py and samples the model folder and the workdir with ``python -m mdt_jax.sample``.
Then, in scratch copies, it resumes the workdir to the end and trains the same run uninterrupted,
and records in expected.json what that code computed: the SHA-256 of every leaf of the final
state (params, ema_params, opt_state), under this host's CPU (XLA:CPU's code, and so the last bits
of a training step, differ between CPUs), and of the sampled uint8 images.

  PYTHONPATH=$PWD python tests/data/legacy_95ae3d1/generate.py --add_cpu

adds the final state that code computes on this host's CPU, resuming the committed workdir,
beside the CPUs already recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))

# The tests' XLA flags and 8 CPU devices (tests/conftest.py), before jax loads: the runs here
# compute what the suite's runs compute.
os.environ['XLA_FLAGS'] = (
    '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
    ' --xla_force_host_platform_device_count=8'
)
os.environ['JAX_PLATFORMS'] = 'cpu'
import launch  # noqa: E402

TOTAL_STEPS = 4
STOP_AFTER = 2
OVERRIDES = [
    '--config.model.hidden_size=8',
    '--config.model.depth=2',
    '--config.model.decode_layer=1',
    '--config.checkpoint_every_steps=2',
    '--config.log_every_steps=2',
]
SAMPLE_FLAGS = ['--num_samples=4', '--batch_size=4', '--steps=4', '--seed=1', '--labels=3']


def _run(cmd):
  out = launch.run(cmd, env=launch.env())
  if out.returncode != 0:
    raise SystemExit(f'{cmd} failed:\n{out.stdout[-4000:]}')
  return out


def sha(a) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def state_hashes(workdir: str, step: int) -> dict:
  """The SHA-256 of every leaf of the state a workdir saved at `step`."""
  import jax
  import orbax.checkpoint as ocp

  mngr = ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'),
      item_names=('params', 'ema_params', 'opt_state'),
      options=ocp.CheckpointManagerOptions(read_only=True),
  )
  out = {}
  for name in ('params', 'ema_params', 'opt_state'):
    tree = mngr.restore(step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore()}))[name]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out[name] = {jax.tree_util.keystr(p): sha(np.asarray(v)) for p, v in flat}
  mngr.close()
  return out


def _sample(model: str, out: str) -> str:
  _run([sys.executable, '-m', 'mdt_jax.sample', f'--model={model}', f'--out={out}', *SAMPLE_FLAGS])
  return samples_hash(out)


def samples_hash(out: str) -> str:
  """The SHA-256 of the uint8 images `python -m mdt_jax.sample` wrote to `out`."""
  return sha(np.load(os.path.join(out, 'samples.npz'))['arr_0'])


def main():
  work, folder = os.path.join(HERE, 'workdir'), os.path.join(HERE, 'model')
  for p in (work, folder):
    shutil.rmtree(p, ignore_errors=True)
  flags = OVERRIDES
  _run(launch.main_command(work, TOTAL_STEPS, *flags, signal_at=(STOP_AFTER, 'SIGTERM')))
  if launch.steps_saved(work) != [STOP_AFTER]:
    raise SystemExit(f'expected one checkpoint at step {STOP_AFTER}: {launch.steps_saved(work)}')
  _run(
      [
          sys.executable,
          os.path.join(ROOT, 'tools', 'export_hub.py'),
          f'--workdir={work}',
          f'--out={folder}',
      ]
  )
  with tempfile.TemporaryDirectory() as tmp:
    samples = {
        'model': _sample(folder, os.path.join(tmp, 's_model')),
        'workdir': _sample(work, os.path.join(tmp, 's_work')),
    }
    fresh = os.path.join(tmp, 'fresh')
    final = resumed_state()
    _run(launch.main_command(fresh, TOTAL_STEPS, *flags))
    if final != state_hashes(fresh, TOTAL_STEPS):
      raise SystemExit('the resumed run differs from the uninterrupted one')
  commit = subprocess.run(
      ['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True
  ).stdout.strip()
  expected = dict(
      commit=commit,
      overrides=OVERRIDES,
      total_steps=TOTAL_STEPS,
      stopped_after=STOP_AFTER,
      sample_flags=SAMPLE_FLAGS,
      samples_sha256=samples,
      final_state_sha256_by_cpu={cpu_name(): final},
  )
  _write(expected)


def cpu_name() -> str:
  """This host's CPU model (/proc/cpuinfo), the key of its final state in expected.json."""
  with open('/proc/cpuinfo') as f:
    for line in f:
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  raise SystemExit('no "model name" in /proc/cpuinfo')


def resumed_state() -> dict:
  """The final state hashes of the committed workdir resumed to the end by this checkout."""
  with tempfile.TemporaryDirectory() as tmp:
    resumed = shutil.copytree(os.path.join(HERE, 'workdir'), os.path.join(tmp, 'resumed'))
    _run(launch.main_command(resumed, TOTAL_STEPS, *OVERRIDES))
    return state_hashes(resumed, TOTAL_STEPS)


def add_cpu():
  with open(os.path.join(HERE, 'expected.json')) as f:
    expected = json.load(f)
  expected['final_state_sha256_by_cpu'][cpu_name()] = resumed_state()
  _write(expected)


def _write(expected: dict) -> None:
  with open(os.path.join(HERE, 'expected.json'), 'w') as f:
    json.dump(expected, f, indent=1, sort_keys=True)


if __name__ == '__main__':
  add_cpu() if sys.argv[1:] == ['--add_cpu'] else main()
