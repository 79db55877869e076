"""The private library paths of mdt_jax/compat still hold what the project takes from them."""

import pathlib
import re

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from mdt_jax import compat
from mdt_jax.compat import jax as compat_jax
from mdt_jax.compat import orbax as compat_orbax

ROOT = pathlib.Path(__file__).parents[1]
PRIVATE_IMPORT = re.compile(r'^\s*(?:from|import)\s+[\w.]*\._src\b', re.MULTILINE)


def test_orbax_default_array_handler_is_built_with_the_same_store():
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  assert isinstance(handler._array_metadata_store, compat_orbax.ArrayMetadataStore)
  own = ocp.type_handlers.ArrayHandler(array_metadata_store=compat_orbax.ArrayMetadataStore())
  assert isinstance(own._array_metadata_store, compat_orbax.ArrayMetadataStore)


def _sine(x):
  return jnp.sin(x) + 1.0


def test_jax_hlo_printer_reads_a_compiled_module_with_its_source():
  compiled = jax.jit(_sine).lower(jax.ShapeDtypeStruct((8,), jnp.float32)).compile()
  (proto,) = compiled.runtime_executable().hlo_modules()
  text = compat_jax.hlo_module_text(proto.as_serialized_hlo_module_proto())
  assert re.search(r'= f32\[8\]\{0\} sine\(', text)
  assert 'test_compat.py' in text and '_sine' in text  # the op's metadata: its source
  assert 'test_compat.py' not in compat_jax.hlo_module_text(
      proto.as_serialized_hlo_module_proto(), print_metadata=False
  )


def test_a_moved_private_path_names_itself_and_the_module_to_update():
  with pytest.raises(ImportError, match=r'jax\._src\.no_such_module\.x \(private to jax\) is gone'):
    compat.private_attr('jax._src.no_such_module', 'x', 'jax', '0.10.2', 'mdt_jax.compat.jax')
  with pytest.raises(
      ImportError, match=rf'gone in jax {jax.__version__}; 0\.1 had it.*compat\.jax'
  ):
    compat.private_attr('jax._src.lib', 'no_such_name', 'jax', '0.1', 'mdt_jax.compat.jax')


def test_only_compat_imports_private_paths():
  offenders = [
      str(path.relative_to(ROOT))
      for folder in ('mdt_jax', 'tools')
      for path in sorted((ROOT / folder).rglob('*.py'))
      if 'compat' not in path.parts and PRIVATE_IMPORT.search(path.read_text())
  ]
  assert offenders == [], f'private imports outside mdt_jax/compat: {offenders}'
