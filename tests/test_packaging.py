"""What `pip install mdt_jax` declares is what the package imports, and the entry points stay
light: no torch, no TensorFlow on the way to training or sampling."""

from __future__ import annotations

import ast
import configparser
import functools
import importlib.metadata
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'mdt_jax'
STDLIB = set(sys.stdlib_module_names)
MAX_LINES = 450  # a module of the package holds one thing; past this it holds two


def _requirement_name(line: str) -> str:
  """'orbax-checkpoint>=0.12.8,<0.13' -> 'orbax-checkpoint'; 'etils[epath]>=1' -> 'etils'."""
  return re.split(r'[\s\[<>=!~;]', line.strip(), maxsplit=1)[0].lower().replace('_', '-')


def _setup_cfg() -> configparser.ConfigParser:
  parser = configparser.ConfigParser()
  parser.read(ROOT / 'setup.cfg')
  return parser


def install_requires() -> set[str]:
  lines = _setup_cfg()['options']['install_requires'].strip().splitlines()
  return {_requirement_name(line) for line in lines if line.strip()}


def top_level_imports(path: pathlib.Path) -> set[str]:
  """The top-level names a module imports at its top (not inside a function or class)."""
  names = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      names |= {a.name.split('.')[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
      names.add(node.module.split('.')[0])
  return names - STDLIB - {'mdt_jax', '__future__'}


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
  """Import name -> distributions: read once, it scans every installed distribution's files."""
  return importlib.metadata.packages_distributions()


def _distribution(import_name: str) -> str:
  dists = _packages_distributions().get(import_name)
  assert dists, f'{import_name!r} is imported by mdt_jax but no installed distribution provides it'
  return dists[0].lower().replace('_', '-')


def test_every_module_level_import_is_declared():
  declared = install_requires()
  missing = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    for name in top_level_imports(path):
      dist = _distribution(name)
      if dist not in declared:
        missing.setdefault(dist, []).append(str(path.relative_to(ROOT)))
  assert not missing, f'imported at module level but not in install_requires: {missing}'


def test_declared_requirements_are_pinned_in_requirements_txt():
  """requirements.txt is the pinned set that installs together: it pins every runtime package
  (etils comes pinned with orbax-checkpoint)."""
  pinned = {
      _requirement_name(line)
      for line in (ROOT / 'requirements.txt').read_text().splitlines()
      if line.strip() and not line.startswith('#')
  }
  assert install_requires() - pinned <= {'etils'}, install_requires() - pinned - {'etils'}


def test_no_module_imports_torch_or_tensorflow_at_its_top():
  heavy = {'torch', 'tensorflow', 'tensorflow_datasets', 'transformers', 'diffusers'}
  found = {
      str(p.relative_to(ROOT)): sorted(top_level_imports(p) & heavy)
      for p in sorted(PACKAGE.rglob('*.py'))
      if top_level_imports(p) & heavy
  }
  assert not found, found


def test_tooling_lives_outside_the_package():
  for gone in ('perf', 'studies', 'torch_reference', 'sampler_flags.py'):
    assert not (PACKAGE / gone).exists(), f'mdt_jax/{gone} belongs outside the installed package'


def long_modules(package: pathlib.Path, limit: int = MAX_LINES) -> dict[str, int]:
  """The modules under `package` over `limit` lines: path -> lines."""
  counts = {p: len(p.read_text().splitlines()) for p in sorted(package.rglob('*.py'))}
  return {str(p.relative_to(package.parent)): n for p, n in counts.items() if n > limit}


def test_no_module_of_the_package_is_over_the_line_limit():
  long = long_modules(PACKAGE)
  assert not long, f'split these by what they hold (over {MAX_LINES} lines): {long}'


def test_entry_points_load_neither_torch_nor_tensorflow():
  code = (
      'import sys, mdt_jax.main, mdt_jax.sample, mdt_jax.inpaint, mdt_jax.evaluate\n'
      "print(sorted(m for m in ('torch', 'tensorflow', 'tensorflow_datasets') if m in sys.modules))"
  )
  out = subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True, check=True, cwd=ROOT
  )
  assert out.stdout.strip() == '[]', out.stdout + out.stderr


def test_the_checks_see_an_undeclared_and_a_heavy_import(tmp_path):
  module = tmp_path / 'm.py'
  module.write_text('import os\nimport torch\nfrom flax import nnx\n\ndef f():\n  import scipy\n')
  assert top_level_imports(module) == {'torch', 'flax'}
  assert _requirement_name('etils[epath]>=1.15') == 'etils'
  assert _requirement_name('orbax_checkpoint>=0.12.8,<0.13') == 'orbax-checkpoint'
  package = tmp_path / 'pkg'
  (package / 'sub').mkdir(parents=True)
  (package / 'sub' / 'long.py').write_text('x = 1\n' * (MAX_LINES + 1))
  (package / 'short.py').write_text('x = 1\n' * MAX_LINES)
  assert long_modules(package) == {'pkg/sub/long.py': MAX_LINES + 1}
