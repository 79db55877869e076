"""Collectives of an optimized HLO module (``compiled.as_text()``): kind, bytes, group size; and
the rule that names an op by this project's code in its stack (`own_frame`).

Bytes on the wire per chip follow the ring algorithms (n chips in the group, S the bytes of the
full array): all-gather and reduce-scatter send (n-1)/n S, all-reduce 2 (n-1)/n S (a
reduce-scatter then an all-gather), all-to-all (n-1)/n S, a collective-permute its buffer S.
An instruction inside a loop body is counted once, whatever the trip count (`while_loops` says
whether the module has loops at all). The TPU compiler writes a reduce-scatter as a fusion
(named `all-reduce-scatter`) of an all-reduce whose result the fusion's root dynamic-slices to
this chip's shard: such an all-reduce is counted as the reduce-scatter it is.

Each collective also carries the torus dimensions the TPU compiler's algorithm runs it over at
once, read from its `collective_algorithm_config` (`torus_dims`): a 64-chip all-reduce on v5p's
4x4x4 torus is `UniDirectionNDRingStrategy{colors:6 ...}`, six one-way rings on the three axes'
links, an all-gather `3DAllGatherOnMajorDim`; a group along one axis, one bidirectional ring.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Iterable

from mdt_jax.models.platform import DISPATCH_SOURCE

KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')

_BITS = {
    'pred': 8,
    's4': 4,
    'u4': 4,
    's8': 8,
    'u8': 8,
    's16': 16,
    'u16': 16,
    's32': 32,
    'u32': 32,
    's64': 64,
    'u64': 64,
    'f16': 16,
    'bf16': 16,
    'f32': 32,
    'f64': 64,
    'c64': 64,
    'c128': 128,
}
_ARRAY = re.compile(r'\b(pred|[suf]\d+|bf16|c\d+|f8e\w+?)\[([\d,]*)\](\{[^}]*\})?')
_INSTR = re.compile(r'^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?[\w.\-]+\s*\(.*\{\s*$')
_OPCODE = re.compile(r'\s*([a-z][a-z0-9\-]*)\(')
OWN_CODE = os.sep + 'mdt_jax' + os.sep


def own_frame(stack: Iterable[tuple[str, int, str]]) -> str | None:
  """The innermost frame of this project's code in `stack` ((file, line, function), innermost
  first), past the backend dispatch (models/platform.py, which only forwards to the layer that
  called it): 'models/layers.py:172 Attention.__call__'; None if no frame is ours. Profiles
  (perf/profile.py) and traffic reports (perf/traffic.py) both name ops by it."""
  for path, line, function in stack:
    if OWN_CODE in path and not path.endswith(DISPATCH_SOURCE):
      return f'{path[path.rindex(OWN_CODE) + len(OWN_CODE):]}:{line} {function}'
  return None


@dataclasses.dataclass
class Collective:
  kind: str  # one of KINDS
  full_bytes: int  # S: the whole array (gathered / reduced), per chip
  group: int  # chips in each replica group
  dims: int = 1  # torus dimensions the compiler's algorithm uses at once (1: one ring)

  @property
  def wire_bytes(self) -> float:
    """Bytes each chip sends over ICI (ring algorithms)."""
    n = self.group
    if n <= 1:
      return 0.0
    if self.kind == 'collective-permute':
      return float(self.full_bytes)
    factor = 2.0 if self.kind == 'all-reduce' else 1.0
    return factor * (n - 1) / n * self.full_bytes

  def seconds(self, link_bytes_per_s: float, full_torus: bool) -> float:
    """Time on the wire: the bytes each chip sends over one bidirectional link's bandwidth per
    torus dimension the algorithm uses, where every axis of the slice closes into a ring
    (`Slice.closed`); on an open torus one link, as for any group along one axis."""
    return self.wire_bytes / (link_bytes_per_s * (self.dims if full_torus else 1))


def wire_seconds(collectives: Iterable[Collective], link: float, full_torus: bool) -> float:
  """The collectives' time on the wire, one after another (`Collective.seconds`)."""
  return sum(c.seconds(link, full_torus) for c in collectives)


_DIMS = (
    re.compile(r'"emitter":"(\d)D'),  # 3DAllGatherOnMajorDim
    re.compile(r'UniDirection(\d)DRingStrategy'),
    re.compile(r'\bnum_dims:(\d+)'),
)
_COLORS = re.compile(r'UniDirectionNDRingStrategy\{colors:(\d+)')


def torus_dims(line: str) -> int:
  """The torus dimensions a collective's TPU algorithm runs over at once (its backend config):
  'kD' emitters and one-way ring strategies name them (an ND ring's colors are two one-way rings
  a dimension); 1 where the config names none (one ring: the link the figure assumes)."""
  for pattern in _DIMS:
    m = pattern.search(line)
    if m:
      return max(1, int(m.group(1)))
  m = _COLORS.search(line)
  return max(1, int(m.group(1)) // 2) if m else 1


def arrays(text: str) -> list[tuple[int, int]]:
  """(bytes, memory space) of every array in an HLO type: space 0 is HBM, a layout's S(k)
  another (on TPUs S(1) is the on-chip vector memory)."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(text):
    bits = _BITS.get(dtype, 8)  # float8 variants
    n = math.prod(int(d) for d in dims.split(',') if d) if dims else 1
    space = re.search(r'S\((\d+)\)', layout or '')
    out.append((n * bits // 8, int(space.group(1)) if space else 0))
  return out


def _array_bytes(text: str) -> list[int]:
  return [b for b, _ in arrays(text)]


def _split_type(rest: str) -> tuple[str, str]:
  """'(f32[2], u32[]) op(...' -> ('(f32[2], u32[])', ' op(...'); 'f32[2]{0} op(' likewise."""
  if rest.startswith('('):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        return rest[: i + 1], rest[i + 1 :]
  i = rest.find(' ')
  return rest[:i], rest[i:]


def _top_level_elements(tuple_type: str) -> list[str]:
  inner, parts, depth, cur = tuple_type[1:-1], [], 0, ''
  for ch in inner:
    if ch == ',' and depth == 0:
      parts.append(cur)
      cur = ''
      continue
    depth += ch in '([{'
    depth -= ch in ')]}'
    cur += ch
  return parts + [cur] if cur.strip() else parts


def _group_size(line: str, num_devices: int) -> int:
  m = re.search(r'replica_groups=mesh\[([^\]]*)\]', line)
  # mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, or with device_ids=([..]T(..)) before the axes
  axes = re.search(r"\{('[^}]*)\}", line[m.end() :]) if m else None
  if axes:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", axes.group(1)))
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', line)
  if m:  # iota form [groups, size]<=[...]
    return int(m.group(2))
  m = re.search(r'replica_groups=\{\{([\d,]*)\}', line)
  if m:  # explicit {{0,1,2,3},{...}}
    return len([x for x in m.group(1).split(',') if x])
  if 'source_target_pairs' in line:
    return 2
  return num_devices  # empty groups: every device


def parse_collectives(hlo_text: str, num_devices: int) -> list[Collective]:
  """Every collective instruction of the module (async pairs counted once, at the start)."""
  out: list[Collective] = []
  reduced: dict[str, Collective] = {}  # this computation's synchronous all-reduces, by name
  for line in hlo_text.splitlines():
    if _COMPUTATION.match(line):
      reduced = {}
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    type_text, rest = _split_type(line[m.end() :])
    op = _OPCODE.match(rest)
    if not op:
      continue
    opcode = op.group(1)
    if opcode == 'dynamic-slice' and m.group(1):
      _reduce_scatter_from_slice(reduced, rest[op.end() :], type_text)
      continue
    kind = opcode[: -len('-start')] if opcode.endswith('-start') else opcode
    if kind not in KINDS:
      continue
    if opcode.endswith('-start') and type_text.startswith('('):
      # async start: (operands, results, contexts...); the results are the second element
      elements = _top_level_elements(type_text)
      type_text = elements[1] if len(elements) > 1 else elements[0]
    group = _group_size(line, num_devices)
    size = sum(_array_bytes(type_text))
    if kind == 'reduce-scatter':
      size *= group  # the result is one shard of the reduced array
    out.append(Collective(kind, size, group, torus_dims(line)))
    if opcode == 'all-reduce':
      reduced[m.group(2)] = out[-1]
  return out


def _reduce_scatter_from_slice(reduced: dict[str, Collective], operands: str, type_text: str):
  """A computation's root that slices one chip's shard (1/group of it) out of an all-reduce in
  the same computation: that all-reduce is a reduce-scatter (the TPU's `all-reduce-scatter`)."""
  first = re.search(r'%([\w.\-]+)', operands)  # its first operand
  c = reduced.get(first.group(1)) if first else None
  if (
      c is not None
      and c.kind == 'all-reduce'
      and sum(_array_bytes(type_text)) * c.group == c.full_bytes
  ):
    c.kind = 'reduce-scatter'


def summarize(collectives: list[Collective]) -> dict:
  """{kind: {'count', 'gb' (full arrays), 'wire_gb' (sent per chip)}} for the kinds present."""
  out: dict[str, dict] = {}
  for c in collectives:
    row = out.setdefault(c.kind, {'count': 0, 'gb': 0.0, 'wire_gb': 0.0})
    row['count'] += 1
    row['gb'] += c.full_bytes / 1e9
    row['wire_gb'] += c.wire_bytes / 1e9
  return out


def while_loops(hlo_text: str) -> int:
  """Number of while instructions (their bodies' costs are counted once by XLA and here)."""
  return len(re.findall(r'\swhile\(', hlo_text))
