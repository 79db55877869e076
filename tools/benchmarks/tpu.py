"""TPU generations, slice names as users write them, and compile-only devices for a slice.

With libtpu installed (``pip install -e .[tpu]``) the TPU compiler runs on any CPU host: a named
topology gives compile-only devices, and programs lowered on them compile exactly as they would
for the pod, without the hardware (`jax.experimental.topologies`).

Peak figures per chip: `mdt_jax/training/tpu_chips.py`.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from mdt_jax.training import tpu_chips
from mdt_jax.training.tpu_chips import GENERATIONS, Generation  # noqa: F401


def _shape_3d(chips: int) -> tuple[int, int, int]:
  """The cube-like torus of a power-of-two 3-D slice: 4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4,
  32 -> 2x4x4, 64 -> 4x4x4, ... (each doubling grows the smallest axis, the last of equals)."""
  dims = [2, 2, 1]
  while math.prod(dims) < chips:
    small = min(dims)
    i = max(k for k, v in enumerate(dims) if v == small)
    dims[i] *= 2
  return tuple(dims)


def _shape_2d(chips: int) -> tuple[int, int]:
  """1 -> 1x1, 4 -> 2x2, 8 -> 2x4, 16 -> 4x4, 32 -> 4x8, ... 256 -> 16x16."""
  x = 2 ** (int(math.log2(chips)) // 2)
  return x, chips // x


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: its name as users write it and the compiler's topology."""

  name: str  # v5p-8
  generation: Generation
  shape: tuple[int, ...]  # chips along each torus axis

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def topology(self) -> str:
    """The compiler's topology string, e.g. 'v5p:2x2x1'."""
    return f'{self.generation.name}:' + 'x'.join(map(str, self.shape))

  @property
  def wraparound(self) -> tuple[bool, ...]:
    """Torus links that close each axis (`tpu_chips.wraps`), three as the compiler takes them."""
    w = tpu_chips.wraps(self.generation, self.shape)
    return w + (False,) * (3 - len(w))

  @property
  def closed(self) -> bool:
    """Every axis of more than one chip closes into a ring (`tpu_chips.closed`)."""
    return tpu_chips.closed(self.generation, self.shape)

  def topology_kwargs(self) -> dict:
    """Options of `get_topology_desc`: one device per chip (megacore on v4/v5p) and the hosts."""
    kw = {'wrap': self.wraparound}
    if self.generation.torus_dims == 3:
      kw.update(chip_config_name='megacore', chips_per_host_bounds=(2, 2, 1))
    elif self.chips <= 8:  # v5e/v6e slices up to 8 chips sit on one host
      kw['chips_per_host_bounds'] = (*self.shape, 1)
    else:
      kw['chips_per_host_bounds'] = (2, 2, 1)
    return kw

  def devices(self) -> list:
    """Compile-only devices of this slice (needs libtpu; no TPU)."""
    import os
    from jax.experimental import topologies
    # Compiling needs no chip: let several processes load libtpu at once (its lock file would
    # otherwise refuse every process but the first).
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    try:
      desc = topologies.get_topology_desc(
          platform='tpu', topology_name=self.topology, **self.topology_kwargs()
      )
    except Exception as e:  # noqa: BLE001 - libtpu missing or refusing
      raise RuntimeError(
          f'cannot build TPU topology {self.topology} for {self.name}: {e}. Compiling for TPUs '
          'without one needs libtpu: pip install -e .[tpu]'
      ) from e
    if len(desc.devices) != self.chips:
      raise RuntimeError(
          f'{self.topology} gave {len(desc.devices)} devices, expected one per '
          f'chip ({self.chips})'
      )
    return list(desc.devices)


def known_slices() -> list[str]:
  """Every slice name `parse_slice` accepts, smallest first per generation."""
  out = []
  for g in GENERATIONS.values():
    if g.torus_dims == 3:
      chips = [4 * 2**k for k in range(int(math.log2(g.max_chips // 4)) + 1)]
    else:
      chips = [1] + [4 * 2**k for k in range(int(math.log2(g.max_chips // 4)) + 1)]
    out += [f'{g.name}-{c * g.cores_per_chip}' for c in chips]
  return out


_NAME = re.compile(r'^(v\d+[a-z]*)-(\d+)$')
_TOPOLOGY = re.compile(r'^(v\d+[a-z]*):(\d+(?:x\d+)+)$')


def parse_slice(name: str) -> Slice:
  """'v5p-128' (or the compiler's own 'v5p:4x4x4') -> Slice; unknown names are refused with the
  list of known ones."""
  text = name.strip().lower()
  m = _TOPOLOGY.match(text)
  if m and m.group(1) in GENERATIONS:
    g = GENERATIONS[m.group(1)]
    shape = tuple(int(d) for d in m.group(2).split('x'))
    if len(shape) != g.torus_dims:
      raise ValueError(
          f'TPU slice {name!r}: a {g.name} topology has {g.torus_dims} axes, got '
          f'{len(shape)}; known slices: {", ".join(known_slices())}'
      )
    return Slice(f'{g.name}-{math.prod(shape) * g.cores_per_chip}', g, shape)
  m = _NAME.match(text)
  if m and m.group(1) in GENERATIONS and f'{m.group(1)}-{int(m.group(2))}' in known_slices():
    g = GENERATIONS[m.group(1)]
    chips = int(m.group(2)) // g.cores_per_chip
    shape = _shape_3d(chips) if g.torus_dims == 3 else _shape_2d(chips)
    return Slice(f'{g.name}-{int(m.group(2))}', g, shape)
  raise ValueError(
      f'unknown TPU slice {name!r}; known slices: {", ".join(known_slices())} '
      '(or a topology such as v5p:4x4x12)'
  )


_AVAILABLE = re.compile(r'available HBM \(([\d.]+)([KMGT])\)')
_UNITS = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def compiler_memory_figures(message: str) -> tuple[float, float] | None:
  """(required GB, available GB) from the TPU compiler's out-of-memory refusal, e.g. 'the total
  memory required for HLO temporaries (68.00G) exceeds available HBM (15.75G)' (binary units)."""
  m = re.search(r'required for [^(]*\(([\d.]+)([KMGT])\)[^(]*' + _AVAILABLE.pattern, message)
  if not m:
    return None
  req, ru, avail, au = m.groups()
  return float(req) * _UNITS[ru] / 1e9, float(avail) * _UNITS[au] / 1e9


def usable_hbm_gb(device) -> float | None:
  """HBM per chip that the compiler lets a program use (below the spec sheet's capacity: the
  runtime keeps some), read from its refusal of a program far too large for any chip."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  sh = NamedSharding(Mesh(np.array([device]), ('x',)), P())
  try:
    jax.jit(lambda: jnp.zeros((1 << 42,), jnp.int8), out_shardings=sh).lower().compile()
  except Exception as e:  # noqa: BLE001 - the refusal is what we want
    figures = compiler_memory_figures(str(e))
    return figures[1] if figures else None
  return None
