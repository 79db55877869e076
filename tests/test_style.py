"""The formatter (pyink) and the linter (ruff) configured in pyproject.toml hold for the tree: a
change that is not formatted, or that leaves an unused import or an undefined name, fails."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = ('mdt_jax', 'tests', 'tools', 'configs')


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True, timeout=300
  )


def test_code_is_formatted():
  proc = _run('pyink', '--check', '--diff', *CODE)
  assert proc.returncode == 0, (
      'run: python -m pyink ' + ' '.join(CODE) + '\n' + proc.stdout[-4000:] + proc.stderr[-2000:]
  )


def test_code_passes_the_linter():
  proc = _run('ruff', 'check', '--output-format=concise')
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_the_linter_sees_the_package():
  """The linter's file set is the package, tests, tools and configs (not nothing)."""
  proc = _run('ruff', 'check', '--show-files')
  files = {os.path.relpath(line.strip(), ROOT) for line in proc.stdout.splitlines() if line.strip()}
  for want in (
      'mdt_jax/models/mdt.py',
      'tests/test_style.py',
      'tools/bench.py',
      'configs/quickstart.py',
  ):
    assert want in files, sorted(files)[:20]
