"""jaxlib's HLO printer, which jax reaches through its private ``jax._src.lib``.

Profiles store each executed module as a serialized HloModuleProto; its text, with the
metadata and stack frames of every op, comes from XLA's printer. jax exports no public path to
it (jax 0.10.2: ``jax.lib`` is empty, ``jax.extend`` has no HLO printer).
"""

from __future__ import annotations

from mdt_jax.compat import private_attr

PATH = 'jax._src.lib'

xla_client = private_attr(PATH, 'xla_client', 'jax', '0.10.2', __name__)


def hlo_module_text(serialized_module: bytes, *, print_metadata: bool = True) -> str:
  """The text of a serialized HloModuleProto (with each op's metadata: its source and frames)."""
  options = xla_client.hlo.HloPrintOptions()
  options.print_metadata = print_metadata
  module = xla_client.hlo.HloModule.from_serialized_hlo_module_proto(serialized_module)
  return module.to_string(options)
