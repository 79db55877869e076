"""The package imports only downward, in layers, and its subpackages form no cycle.

Every import of an ``mdt_jax`` module counts, at the top of a file or inside a function: a
function-local import dodges a cycle at import time but leaves the circle in the design.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The layer of each unit (a subpackage or a module at the package root); a unit imports only
# units of its own layer or below, and no two units import each other, even through others.
LAYERS = {
    # plain helpers every layer uses: paths, atomic writes, image files, progress bars, user
    # errors, the fault hook
    'errors': 0,
    'faults': 0,
    'paths': 0,
    'atomic': 0,
    'images': 0,
    'progress': 0,
    # the private library paths, one module each (mdt_jax/compat)
    'compat': 0,
    'models': 1,
    # the training config's fields (configs/*.py start from it)
    'configs_base': 1,
    'diffusion': 1,
    'data': 2,
    'vae': 2,
    'sampling': 2,
    'evaluation': 2,
    'training': 3,
    'hub': 4,
    # the public package API (mdt_jax/__init__.py), entry points, tools on top
    'mdt_jax': 5,
    'main': 5,
    'sample': 5,
    'evaluate': 5,
    'inpaint': 5,
    'cli': 5,
    'tools': 5,
}


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = list(path.relative_to(root).with_suffix('').parts)
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def package_modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
  """Module name -> file, for mdt_jax/ and tools/ (its scripts and their packages)."""
  files = sorted((root / 'mdt_jax').rglob('*.py')) + sorted((root / 'tools').rglob('*.py'))
  return {_module_name(p, root): p for p in files}


def _resolve(name: str, modules: dict) -> str | None:
  """The mdt_jax module a dotted name lives in (the longest module prefix), or None."""
  parts = name.split('.')
  for i in range(len(parts), 0, -1):
    if '.'.join(parts[:i]) in modules:
      return '.'.join(parts[:i])
  return None


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict) -> set[str]:
  """The mdt_jax modules an import statement loads: 'from a import b' loads the module a.b
  when there is one, else the package a."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom):
    base = node.module or ''
    if node.level:
      parent = module.split('.')
      parent = parent[: len(parent) - node.level + (1 if is_package else 0)]
      base = '.'.join(parent + ([node.module] if node.module else []))
    names = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names]
  else:
    return set()
  return {_resolve(n, modules) for n in names if n.split('.')[0] == 'mdt_jax'} - {None, module}


def unit(module: str) -> str:
  """'mdt_jax.training.loop' -> 'training'; 'mdt_jax.paths' -> 'paths'; 'tools.bench' -> 'tools'."""
  parts = module.split('.')
  return parts[0] if parts[0] == 'tools' or len(parts) == 1 else parts[1]


def import_edges(
    modules: dict[str, pathlib.Path], root: pathlib.Path = ROOT
) -> list[tuple[str, str, str]]:
  """(importer, imported module, 'file:line') for every import of an mdt_jax module."""
  edges = set()
  for name, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      for target in _imported(node, name, path.name == '__init__.py', modules):
        edges.add((name, target, f'{path.relative_to(root)}:{node.lineno}'))
  return sorted(edges)


def upward_edges(edges) -> list[str]:
  return [
      f'{where}: {a} (layer {LAYERS[unit(a)]}) imports {b} (layer {LAYERS[unit(b)]})'
      for a, b, where in edges
      if LAYERS[unit(a)] < LAYERS[unit(b)]
  ]


def unit_cycles(edges) -> list[list[str]]:
  """The strongly connected groups of two or more units (Tarjan), each as its import edges."""
  graph: dict[str, set[str]] = {}
  for a, b, _ in edges:
    if unit(a) != unit(b):
      graph.setdefault(unit(a), set()).add(unit(b))
  index, low, stack, on, groups = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = set()
      while True:
        w = stack.pop()
        on.discard(w)
        group.add(w)
        if w == v:
          break
      if len(group) > 1:
        groups.append(group)

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return [
      sorted(
          f'{where}: {a} imports {b}'
          for a, b, where in edges
          if unit(a) in g and unit(b) in g and unit(a) != unit(b)
      )
      for g in groups
  ]


EDGES = import_edges(package_modules())


def test_every_unit_has_a_layer():
  units = {unit(m) for m in package_modules()}
  assert not units - set(LAYERS), f'give these a layer in LAYERS: {sorted(units - set(LAYERS))}'


def test_imports_go_only_downward():
  bad = upward_edges(EDGES)
  assert not bad, 'upward imports:\n' + '\n'.join(bad)


def test_no_cycle_between_subpackages():
  cycles = unit_cycles(EDGES)
  assert not cycles, 'import cycles:\n' + '\n\n'.join('\n'.join(c) for c in cycles)


def design_table_layers(text: str) -> dict[str, int]:
  """Unit -> layer, from the layout table of docs/design.md (rows '| layer | `unit`, ... | ...');
  a row of tools/ gives the unit 'tools'."""
  layers = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) < 2 or not cells[0].isdigit():
      continue
    for name in re.findall(r'`([^`]+)`', cells[1]):
      layers['tools' if name.startswith('tools') else name.rstrip('/')] = int(cells[0])
  return layers


def test_the_design_notes_give_each_unit_its_layer():
  table = design_table_layers((ROOT / 'docs' / 'design.md').read_text())
  assert table == LAYERS, {
      u: (table.get(u), LAYERS.get(u))
      for u in set(table) | set(LAYERS)
      if table.get(u) != LAYERS.get(u)
  }
  row = (
      '| 2 | `data/`, `vae` | ... | layers 0-2 |\n| - | `tests/` | ... |\n| 5 | `tools/*.py` | x |'
  )
  assert design_table_layers(row) == {'data': 2, 'vae': 2, 'tools': 5}


def test_the_checks_see_upward_imports_and_cycles(tmp_path):
  """The checks above fail on a planted upward import (inside a function) and cycle."""
  pkg = tmp_path / 'mdt_jax'
  for name, text in {
      '__init__.py': '',
      'models/__init__.py': '',
      'models/mdt.py': 'def f():\n  from mdt_jax.training import loop\n',
      'training/__init__.py': '',
      'training/loop.py': 'import mdt_jax.models.mdt\n',
      'hub/__init__.py': 'from . import folder\n',
      'hub/folder.py': 'from ..training.loop import x\n',
  }.items():
    (pkg / name).parent.mkdir(parents=True, exist_ok=True)
    (pkg / name).write_text(text)
  edges = import_edges(package_modules(tmp_path), tmp_path)
  assert [(a, b) for a, b, _ in edges] == [
      ('mdt_jax.hub', 'mdt_jax.hub.folder'),
      ('mdt_jax.hub.folder', 'mdt_jax.training.loop'),
      ('mdt_jax.models.mdt', 'mdt_jax.training.loop'),
      ('mdt_jax.training.loop', 'mdt_jax.models.mdt'),
  ]
  assert upward_edges(edges) == [
      'mdt_jax/models/mdt.py:2: mdt_jax.models.mdt (layer 1) imports mdt_jax.training.loop '
      '(layer 3)'
  ]
  assert unit_cycles(edges) == [
      [
          'mdt_jax/models/mdt.py:2: mdt_jax.models.mdt imports mdt_jax.training.loop',
          'mdt_jax/training/loop.py:1: mdt_jax.training.loop imports mdt_jax.models.mdt',
      ]
  ]


if __name__ == '__main__':
  pytest.main([__file__, '-q'])
