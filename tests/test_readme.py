"""The README's quickstart command, run as the README prints it, from a fresh current folder.

Every other test hands the code absolute temporary paths; a relative --workdir once crashed the
first checkpoint (orbax wants absolute paths) while the whole suite passed. This test reads the
command out of README.md, so the README and the code cannot drift apart.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cut the 4,000-step run to a few steps that still save, resume, draw a grid and evaluate.
SHORT = ['--config.total_steps=4', '--config.checkpoint_every_steps=2',
         '--config.log_every_steps=2', '--config.sample_every_steps=4',
         '--config.sampling.steps=5', '--config.eval_num_samples=20']


def readme_commands(section: str) -> list[list[str]]:
  """The indented shell commands of a README section, each split at '&&' into argv lists."""
  text = open(os.path.join(ROOT, 'README.md')).read()
  body = re.search(rf'^## {section}\n(.*?)(?=^## )', text, re.S | re.M)
  assert body, f'README.md has no "## {section}" section'
  lines = [ln.strip() for ln in body.group(1).splitlines() if ln.startswith('    ')]
  return [shlex.split(part) for ln in lines for part in ln.split('&&')]


def quickstart_command() -> list[str]:
  """The training command of the quickstart (the install before it is the environment's)."""
  cmds = readme_commands('Quickstart \\(any CPU, offline\\)')
  train = [c for c in cmds if c[:3] == ['python', '-m', 'mdt_jax.main']]
  assert len(train) == 1, f'expected one training command in the quickstart, got {cmds}'
  installs = [c for c in cmds if c[:4] == ['python', '-m', 'pip', 'install']]
  assert installs, 'the quickstart no longer installs the package first'
  return [sys.executable] + train[0][1:]


def test_readme_quickstart_runs_as_printed_from_a_fresh_folder(tmp_path):
  cmd = quickstart_command()
  workdir = next(a.split('=', 1)[1] for a in cmd if a.startswith('--workdir='))
  assert not os.path.isabs(workdir), 'the README shows a relative workdir; test it that way'
  # A newcomer's folder: the repository's configs/ beside nothing else.
  shutil.copytree(os.path.join(ROOT, 'configs'), tmp_path / 'configs')
  env = dict(os.environ, PYTHONPATH=ROOT)

  def run(*extra):
    proc = subprocess.run(cmd + SHORT + list(extra), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr

  run('--config.total_steps=2')
  out = run()                                 # resumes the relative workdir and finishes
  assert 'resuming from step 2' in out
  work = tmp_path / workdir
  assert sorted(os.listdir(work / 'checkpoints')) == ['2', '4']
  grid = np.asarray(Image.open(work / 'samples' / 'grid_00000004.png'))
  # 10 classes x 8 per class of 16x16 digits with 2-pixel gutters, RGB
  assert grid.shape == (10 * 18 - 2, 8 * 18 - 2, 3), grid.shape
  result = json.loads((work / 'eval.json').read_text())
  assert result['step'] == 4 and result['eval_num_samples'] == 20
  assert 0.0 <= result['digits_class_accuracy'] <= 1.0 and result['digits_fd'] > 0
