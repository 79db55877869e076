"""The README's commands, run as the README prints them (or cut short), from a fresh folder.

Every other test hands the code absolute temporary paths; a relative --workdir once crashed the
first checkpoint (orbax wants absolute paths) while the whole suite passed. This test reads the
commands out of README.md (the quickstart's training, its picture, the test command CI runs), so
the README and the code cannot drift apart.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tensorboard_events import read_events, scalar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cut the 4,000-step run to a few steps that still save, resume, draw a grid and evaluate.
SHORT = [
    '--config.total_steps=4',
    '--config.checkpoint_every_steps=2',
    '--config.log_every_steps=2',
    '--config.sample_every_steps=4',
    '--config.sampling.steps=5',
    '--config.eval_num_samples=20',
]
# The picture from the trained run, cut to 2 samples per class and 2 sampling steps.
SHORT_PICTURE = ['--num_samples=20', '--grid_size=20', '--steps=2']


def readme_commands(section: str) -> list[list[str]]:
  """The indented shell commands of a README section, each split at '&&' into argv lists."""
  text = open(os.path.join(ROOT, 'README.md')).read()
  body = re.search(rf'^## {section}\n(.*?)(?=^## )', text, re.S | re.M)
  assert body, f'README.md has no "## {section}" section'
  lines = [ln.strip() for ln in body.group(1).splitlines() if ln.startswith('    ')]
  return [shlex.split(part) for ln in lines for part in ln.split('&&')]


def quickstart_commands(module: str) -> list[list[str]]:
  """The quickstart's commands that run ``python -m module``."""
  cmds = readme_commands('Quickstart \\(any CPU, offline\\)')
  return [c for c in cmds if c[:3] == ['python', '-m', module]]


def quickstart_command() -> list[str]:
  """The training command of the quickstart (the install before it is the environment's)."""
  train = quickstart_commands('mdt_jax.main')
  assert len(train) == 1, f'expected one training command in the quickstart, got {train}'
  installs = quickstart_commands('pip')
  assert installs and installs[0][3] == 'install', 'the quickstart no longer installs first'
  return [sys.executable] + train[0][1:]


def picture_command() -> list[str]:
  """The quickstart's sampling command that draws the README's picture."""
  cmds = quickstart_commands('mdt_jax.sample')
  assert len(cmds) == 1, f'expected one sampling command in the quickstart, got {cmds}'
  return [sys.executable] + cmds[0][1:]


def test_readme_test_command_is_what_ci_runs():
  """The README's test section: the install and the pytest command of .ci/run (which adds -q to
  pip for a quieter log)."""
  readme = readme_commands('Tests')
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    ci = [shlex.split(ln) for ln in f.read().splitlines() if ln.startswith('python -m p')]
  ci = [[a for a in c if a != '-q'] if c[2] == 'pip' else c for c in ci]
  ci = [c for c in ci if c[:5] != ['python', '-m', 'pip', 'install', '--upgrade']]
  ci = [c[: c.index('||')] if '||' in c else c for c in ci]
  assert readme == ci, (readme, ci)


def test_readme_quickstart_runs_as_printed_from_a_fresh_folder(tmp_path):
  cmd = quickstart_command()
  workdir = next(a.split('=', 1)[1] for a in cmd if a.startswith('--workdir='))
  assert not os.path.isabs(workdir), 'the README shows a relative workdir; test it that way'
  # A newcomer's folder: the repository's configs/ beside nothing else.
  shutil.copytree(os.path.join(ROOT, 'configs'), tmp_path / 'configs')
  env = dict(os.environ, PYTHONPATH=ROOT)

  def run(*extra):
    proc = subprocess.run(
        cmd + SHORT + list(extra),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr

  run('--config.total_steps=2')
  out = run()  # resumes the relative workdir and finishes
  assert 'resuming from step 2' in out
  work = tmp_path / workdir
  assert sorted(os.listdir(work / 'checkpoints')) == ['2', '4']
  check_grid(work / 'samples' / 'grid_00000004.png')
  result = json.loads((work / 'eval.json').read_text())
  assert sorted(result) == [
      'digits_class_accuracy',
      'digits_fd',
      'eval_num_samples',
      'eval_seconds',
      'step',
  ]
  assert result['step'] == 4 and result['eval_num_samples'] == 20 and result['eval_seconds'] > 0
  # accuracy of 20 samples: a multiple of 1/20 in [0, 1]; the Frechet distance of features
  # of a 4-step model's samples: finite and positive
  acc = result['digits_class_accuracy']
  assert 0.0 <= acc <= 1.0 and abs(acc * 20 - round(acc * 20)) < 1e-9, acc
  assert np.isfinite(result['digits_fd']) and result['digits_fd'] > 0
  check_tensorboard(str(work), result)
  check_picture(tmp_path, env)


def check_picture(folder, env):
  """The README's picture command on the trained run: one row per class 0-9, each row's label
  drawn at its left, the tiles enlarged; every row holds its class's two samples."""
  cmd = picture_command() + SHORT_PICTURE
  proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = next(a.split('=', 1)[1] for a in cmd if a.startswith('--out='))
  scale = int(next(a.split('=', 1)[1] for a in cmd if a.startswith('--grid_scale=')))
  assert scale > 1 and '--grid_labels' in cmd
  grid = np.asarray(Image.open(folder / out / 'samples_grid.png'))
  tile = 16 * scale
  assert grid.shape[0] == 10 * (tile + 2) - 2, grid.shape
  label_w = grid.shape[1] - (2 * (tile + 2) - 2)
  assert label_w > 0
  for r in range(10):
    band = grid[r * (tile + 2) : r * (tile + 2) + tile]
    assert (band[:, :label_w] < 128).any(), f'no label drawn for row {r}'
    for k in range(2):
      cell = band[:, label_w + k * (tile + 2) : label_w + k * (tile + 2) + tile, 0]
      assert cell.std() > 5, (r, k)  # a sample, not an empty slot
  assert 'sampling: 20/20 images (100%)' in proc.stderr  # progress in a log: one line per 10%


def check_grid(path):
  """10 classes x 8 per class of 16x16 digits, 2-pixel white gutters, gray RGB, every tile a
  sample (not blank, not one flat value)."""
  grid = np.asarray(Image.open(path))
  assert grid.dtype == np.uint8 and grid.shape == (10 * 18 - 2, 8 * 18 - 2, 3), grid.shape
  assert (grid[16::18] == 255).all() and (grid[:, 16::18] == 255).all()  # gutters
  assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 0] == grid[..., 2]).all()
  tiles = [grid[r * 18 : r * 18 + 16, c * 18 : c * 18 + 16, 0] for r in range(10) for c in range(8)]
  assert all(t.std() > 5 for t in tiles), min(t.std() for t in tiles)
  # tiles differ from each other (distinct noise per sample)
  assert len({t.tobytes() for t in tiles}) == len(tiles)


def check_tensorboard(workdir: str, result: dict):
  """The scalars the quickstart logged, read back from its two event files (run and resume):
  training metrics at steps 2 and 4, the end-of-run evaluation equal to eval.json, the grid."""
  events = read_events(workdir)
  for tag in ('loss', 'plain/loss', 'masked/loss', 'grad_norm', 'learning_rate'):
    assert sorted(events[tag]) == [2, 4], (tag, sorted(events[tag]))
    for step in (2, 4):
      assert np.isfinite(scalar(events, tag, step)) and scalar(events, tag, step) > 0
  assert scalar(events, 'learning_rate', 4) == pytest.approx(1.5e-3, rel=1e-6)  # the config's
  for tag in ('digits_fd', 'digits_class_accuracy'):
    assert scalar(events, tag, 4) == pytest.approx(result[tag], rel=1e-6)
  assert len(events['samples'][4]) == 1
