"""Every `python -m mdt_jax.X` / `python tools/X.py` command of docs/*.md, README.md and
BENCHMARKS.md parses: its flags are its program's (a renamed flag or config field in the code
fails here), checked by each program's own parser in one fresh process, nothing run
(tests/docs_commands.py)."""

import glob
import json
import os
import subprocess
import sys

import pytest

import docs_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md'))) + [
    os.path.join(ROOT, name) for name in ('README.md', 'BENCHMARKS.md')
]
# commands that must be refused, one per kind of parser and mistake
BAD = [
    ('mdt_jax.sample', ['--model=DIR', '--num_sample=5']),  # absl: unknown flag
    ('mdt_jax.sample', ['--steps=twenty']),  # absl: a value of the wrong type
    ('mdt_jax.main', ['--config=configs/quickstart.py', '--config.align.methods=sra']),
    ('mdt_jax.evaluate', ['--samples_file', 'x.npz']),  # argparse
    ('tools/convert_official.py', ['--ckpt', 'x.pt']),
    ('tools/learning_curves.py', ['--config.train.total_step=3']),  # a study's config
]


def _page_commands():
  return [
      (os.path.relpath(page, ROOT), program, args)
      for page in PAGES
      for program, args in docs_commands.commands(open(page).read())
  ]


def test_commands_are_found_in_the_pages_with_their_continued_lines():
  text = 'Run\n\n    python -m mdt_jax.sample --model=M --steps=5 \\\n        --out=O  # note\n'
  text += '\n`python tools/bench.py --config=CONFIG [--eager_baseline] ...` and `x`\n'
  assert docs_commands.commands(text) == [
      ('mdt_jax.sample', ['--model=M', '--steps=5', '--out=O']),
      ('tools/bench.py', ['--config=CONFIG', '--eager_baseline']),
  ]
  found = _page_commands()
  assert len(found) >= 30
  for page, program, _ in found:
    path = program if program.startswith('tools/') else program.replace('.', '/') + '.py'
    assert os.path.isfile(os.path.join(ROOT, path)), f'{page}: no program {program}'


@pytest.fixture(scope='module')
def refused():
  items = [(program, args) for _, program, args in _page_commands()] + BAD
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tests', 'docs_commands.py')],
      input=json.dumps(items),
      capture_output=True,
      text=True,
      cwd=ROOT,
      env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'},
      timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return [(p, a, e) for p, a, e in json.loads(out.stdout)]


def test_every_command_in_the_docs_parses(refused):
  pages = {(p, tuple(a)): page for page, p, a in _page_commands()}
  wrong = [
      f'{pages[(p, tuple(a))]}: python {p} {" ".join(a)}: {e}'
      for p, a, e in refused
      if (p, tuple(a)) in pages
  ]
  assert not wrong, '\n'.join(wrong)


def test_a_renamed_flag_or_field_is_refused(refused):
  got = {(p, tuple(a)): e for p, a, e in refused}
  for program, args in BAD:
    assert (program, tuple(args)) in got, f'accepted: python {program} {" ".join(args)}'
  assert 'num_sample' in got[BAD[0][0], tuple(BAD[0][1])]
