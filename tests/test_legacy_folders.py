"""A model folder and a workdir written by older code (tests/data/legacy_95ae3d1) still load,
sample and resume to what that code computed from them (its expected.json)."""

import importlib.util
import json
import os
import shutil

import pytest

import launch
from mdt_jax import sample

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'legacy_95ae3d1')


def _generator():
  spec = importlib.util.spec_from_file_location('legacy_generate', f'{LEGACY}/generate.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


GEN = _generator()
EXPECTED = json.load(open(os.path.join(LEGACY, 'expected.json')))


def _copy(name, tmp_path) -> str:
  """A writable copy: the tests must not change the fixture."""
  return shutil.copytree(os.path.join(LEGACY, name), str(tmp_path / name))


@pytest.mark.parametrize('what', ['model', 'workdir'])
def test_legacy_folder_samples_as_written(what, tmp_path):
  out = str(tmp_path / 'out')
  launch.run_main(sample, f'--model={_copy(what, tmp_path)}', f'--out={out}', *GEN.SAMPLE_FLAGS)
  assert GEN.samples_hash(out) == EXPECTED['samples_sha256'][what]


def test_legacy_workdir_resumes_to_the_same_state(tmp_path):
  work = _copy('workdir', tmp_path)
  out = launch.run(launch.main_command(work, EXPECTED['total_steps'], *EXPECTED['overrides']))
  assert out.returncode == 0, out.stdout[-3000:]
  assert f'resuming from step {EXPECTED["stopped_after"]}' in out.stdout
  got = GEN.state_hashes(work, EXPECTED['total_steps'])
  with open(os.path.join(work, 'config.json')) as f:
    data = json.load(f)['data']  # rewritten by the resumed run, under today's names
  assert data['vae'] is None and 'vae_decoder' not in data
  # what 95ae3d1's code computed from this workdir, on each CPU it was recorded on (XLA:CPU's
  # code differs between CPUs: generate.py --add_cpu records another)
  recorded = EXPECTED['final_state_sha256_by_cpu']
  same = [cpu for cpu, state in recorded.items() if state == got]
  assert same, (
      f'the resumed state is none of those 95ae3d1 computed on {sorted(recorded)} '
      f'(this CPU: {GEN.cpu_name()!r})'
  )
